"""Models built from attnkit layers, and loading them from GGUF files or HF directories."""

from attnkit.models.llama import LlamaConfig, Transformer
from attnkit.models.loading import DEFAULT_MODEL, known_models, load_model

__all__ = ["DEFAULT_MODEL", "LlamaConfig", "Transformer", "known_models", "load_model"]
