"""Small pieces shared by the backends."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops.problem import AttentionProblem


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
    return zero_keys(k, v, ~allowed.any(dim=-2).squeeze(1))


def zero_keys(k: Tensor, v: Tensor, unseen: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the keys/values flagged in `unseen` `(B or 1, n_k)`; returns inputs if none are."""
    if not unseen.any():
        return k, v
    hidden = unseen[:, None, :, None]
    return k.masked_fill(hidden, 0), v.masked_fill(hidden, 0)


def unseen_keys(p: AttentionProblem, rows_per_chunk: int = 1024) -> Tensor:
    """`(B or 1, n_k)`: keys no query may see, evaluating the mask a chunk of rows at a time
    (O(n_k) memory, for backends that never build the dense mask)."""
    batch = p.mask.batch_size or 1
    device = p.q.device
    b = torch.arange(batch, device=device).view(-1, 1, 1)
    cols = torch.arange(p.n_k, device=device).view(1, 1, -1)
    seen = torch.zeros(batch, p.n_k, dtype=torch.bool, device=device)
    for start in range(0, p.n_q, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, p.n_q), device=device)
        allowed = p.mask.allowed(b, rows.view(1, -1, 1), cols, p.geometry)
        seen |= allowed.expand(batch, len(rows), p.n_k).any(1)
    return ~seen


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in float32 for half types (as FlashAttention does), else keep the dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32
