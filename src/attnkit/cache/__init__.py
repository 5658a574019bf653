"""KV caches: one protocol (prepare / update / truncate / fork / free / nbytes), many stores."""

from attnkit.cache.base import CacheFull, CacheStep, KVCache, causal_step_mask
from attnkit.cache.contiguous import ContiguousCache

__all__ = ["CacheFull", "CacheStep", "ContiguousCache", "KVCache", "causal_step_mask"]
