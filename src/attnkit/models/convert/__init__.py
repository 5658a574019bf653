"""Conversions between attention variants on a loaded model (fewer KV heads, MHA, RoPE, MLA)."""

from attnkit.models.convert.heads import expand_to_mha, kv_bytes_per_token, pool_kv_heads
from attnkit.models.convert.mla import max_kv_rank, mla_kv_bytes_per_token, rope_dim_range, to_mla
from attnkit.models.convert.rope import with_rope_scaling

__all__ = [
    "expand_to_mha",
    "kv_bytes_per_token",
    "max_kv_rank",
    "mla_kv_bytes_per_token",
    "pool_kv_heads",
    "rope_dim_range",
    "to_mla",
    "with_rope_scaling",
]
