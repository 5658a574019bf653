"""Merging attention over disjoint key sets by their log-sum-exp (the split-KV trick)."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_attention(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Combine `(out, lse)` pairs computed over disjoint key sets into attention over all.

    Each `out` is `(..., n_q, d)` and each `lse` `(..., n_q)`. Weights are
    `exp(lse_i - lse)` with `lse = logsumexp_i(lse_i)`; parts whose rows saw no key
    (lse -inf) get weight 0, and rows no part saw stay 0 with lse -inf.
    """
    if not parts:
        raise ValueError("parts must hold at least one (out, lse) pair, got none")
    out_shape = parts[0][0].shape
    for i, (out, lse) in enumerate(parts):
        if out.shape != out_shape:
            raise ValueError(
                f"part {i}: out has shape {tuple(out.shape)}, part 0 has {tuple(out_shape)}"
            )
        if lse.shape != out.shape[:-1]:
            raise ValueError(
                f"part {i}: lse has shape {tuple(lse.shape)}, expected {tuple(out.shape[:-1])}"
            )
    lses = torch.stack([lse for _, lse in parts])  # (P, ..., n_q)
    total = torch.logsumexp(lses, dim=0)
    safe_total = torch.where(torch.isinf(total), 0.0, total)
    weights = torch.exp(lses - safe_total)  # exactly 0 for parts with lse -inf
    out = sum(w.unsqueeze(-1).to(o.dtype) * o for w, (o, _) in zip(weights, parts, strict=True))
    return out, total
