"""Models built from attnkit layers, and loading them from GGUF files or HF directories."""

from attnkit.models.llama import LlamaConfig, Transformer
from attnkit.models.loading import DEFAULT_MODEL, known_models, load_model
from attnkit.models.seq2seq import Seq2Seq, Seq2SeqCache, Seq2SeqConfig

__all__ = [
    "DEFAULT_MODEL",
    "LlamaConfig",
    "Seq2Seq",
    "Seq2SeqCache",
    "Seq2SeqConfig",
    "Transformer",
    "known_models",
    "load_model",
]
