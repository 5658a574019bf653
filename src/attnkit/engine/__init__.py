"""Generation: sampling, the `generate()` loop, and (as they land) scheduling and speculation."""

from attnkit.engine.generate import GenerationResult, GenerationStats, generate
from attnkit.engine.sampling import SamplingParams, next_tokens
from attnkit.engine.scheduler import Request, Scheduler
from attnkit.engine.speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeStats,
    first_layers,
    speculative_generate,
)

__all__ = [
    "GenerationResult",
    "GenerationStats",
    "ModelDrafter",
    "PromptLookupDrafter",
    "Request",
    "SamplingParams",
    "Scheduler",
    "SpeculativeStats",
    "first_layers",
    "generate",
    "next_tokens",
    "speculative_generate",
]
