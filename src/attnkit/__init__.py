"""attnkit: the attention family for transformers, one fast API."""

from importlib.metadata import PackageNotFoundError, version

from attnkit import masks
from attnkit.layers.rope import RopeScaling, RotaryEmbedding
from attnkit.ops.attention import attention, choose_backend
from attnkit.ops.backends import available_backends
from attnkit.ops.merge import merge_attention

try:
    __version__ = version("attnkit")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "RopeScaling",
    "RotaryEmbedding",
    "__version__",
    "attention",
    "available_backends",
    "choose_backend",
    "masks",
    "merge_attention",
]
