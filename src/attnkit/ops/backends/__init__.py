"""Attention backends: `reference`, `tiled`, `sdpa` always; others register if importable."""

from attnkit.ops.backends.banded import BandedBackend
from attnkit.ops.backends.base import Backend, available_backends, get_backend, register
from attnkit.ops.backends.cpu_decode import CppDecodeBackend
from attnkit.ops.backends.gathered import GatheredBackend
from attnkit.ops.backends.reference import ReferenceBackend
from attnkit.ops.backends.sdpa import SdpaBackend
from attnkit.ops.backends.tiled import TiledBackend
from attnkit.ops.backends.triton import TritonBackend

register(ReferenceBackend())
register(TiledBackend())
register(SdpaBackend())
register(GatheredBackend())
register(CppDecodeBackend())
register(BandedBackend())
register(TritonBackend())

__all__ = [
    "Backend",
    "BandedBackend",
    "CppDecodeBackend",
    "GatheredBackend",
    "ReferenceBackend",
    "SdpaBackend",
    "TiledBackend",
    "TritonBackend",
    "available_backends",
    "get_backend",
    "register",
]

from attnkit.ops.backends import flex  # noqa: E402

if flex.flex_attention is not None:
    register(flex.FlexBackend())
