"""Small pieces shared by the backends."""

from __future__ import annotations

import torch
from torch import Tensor


def fold_groups(q: Tensor, kv_heads: int) -> Tensor:
    """(B, H, n, d) -> (B, H_kv, G·n, d): each KV head's query group stacked along the rows.

    Query head `h` uses KV head `h // G`, so the G heads sharing a KV head become one
    longer sequence against it; K and V are never repeated.
    """
    b, h, n, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * n, d)


def unfold_groups(x: Tensor, heads: int) -> Tensor:
    """Inverse of `fold_groups` for outputs `(B, H_kv, G·n, d)` or lse `(B, H_kv, G·n)`."""
    b, kv_heads = x.shape[:2]
    n = x.shape[2] * kv_heads // heads
    return x.reshape(b, heads, n, *x.shape[3:])


def zero_unseen_keys(k: Tensor, v: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Zero keys/values that no query may see, so NaN/inf stored there cannot leak.

    `allowed` is `(B or 1, 1, n_q, n_k)`. A masked score is -inf and its weight exactly 0,
    but 0 · NaN is NaN: padded slots and unused cache entries must not reach the matmul.
    """
    unseen = ~allowed.any(dim=-2).unsqueeze(-1)  # (B or 1, 1, n_k, 1)
    if not unseen.any():
        return k, v
    return k.masked_fill(unseen, 0), v.masked_fill(unseen, 0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 for half types (as FlashAttention does), else keep the dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
