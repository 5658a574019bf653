"""KV caches: one protocol (prepare / update / truncate / fork / free / nbytes), many stores."""

from attnkit.cache.base import CacheFull, CacheStep, KVCache, causal_step_mask
from attnkit.cache.contiguous import ContiguousCache
from attnkit.cache.encoder import EncoderCache
from attnkit.cache.eviction import H2OCache, StreamingLLMCache
from attnkit.cache.latent import LatentCache
from attnkit.cache.layered import LayeredCache
from attnkit.cache.linear_state import LinearStateCache
from attnkit.cache.paged import PagedCache
from attnkit.cache.quantized import QuantizedCache
from attnkit.cache.window import SlidingWindowCache

__all__ = [
    "CacheFull",
    "CacheStep",
    "ContiguousCache",
    "EncoderCache",
    "H2OCache",
    "KVCache",
    "LatentCache",
    "LayeredCache",
    "LinearStateCache",
    "PagedCache",
    "QuantizedCache",
    "SlidingWindowCache",
    "StreamingLLMCache",
    "causal_step_mask",
]
