"""nn.Modules that own weights: attention layers and rotary embeddings."""

from attnkit.layers.attention import Attention, AttentionContext
from attnkit.layers.latent import LatentAttention
from attnkit.layers.linear import LinearAttention
from attnkit.layers.rope import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    NTKScaling,
    RopeScaling,
    RotaryEmbedding,
    YarnScaling,
    apply_rotary,
)

__all__ = [
    "Attention",
    "AttentionContext",
    "DynamicNTKScaling",
    "LatentAttention",
    "LinearAttention",
    "LinearScaling",
    "Llama3Scaling",
    "NTKScaling",
    "RopeScaling",
    "RotaryEmbedding",
    "YarnScaling",
    "apply_rotary",
]
