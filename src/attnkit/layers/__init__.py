"""nn.Modules that own weights: attention layers and rotary embeddings."""

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
    "DynamicNTKScaling",
    "LinearScaling",
    "Llama3Scaling",
    "NTKScaling",
    "RopeScaling",
    "RotaryEmbedding",
    "YarnScaling",
    "apply_rotary",
]
