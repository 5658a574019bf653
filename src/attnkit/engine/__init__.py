"""Generation: sampling, the `generate()` loop, and (as they land) scheduling and speculation."""

from attnkit.engine.generate import GenerationResult, GenerationStats, generate
from attnkit.engine.sampling import SamplingParams, next_tokens

__all__ = ["GenerationResult", "GenerationStats", "SamplingParams", "generate", "next_tokens"]
