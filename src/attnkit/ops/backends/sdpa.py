"""torch.nn.functional.scaled_dot_product_attention, with GQA folding for short queries."""

from __future__ import annotations

from contextlib import nullcontext

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.ops.backends.base import Backend
from attnkit.ops.backends.common import fold_groups, unfold_groups, zero_unseen_keys
from attnkit.ops.masks import causal
from attnkit.ops.problem import AttentionProblem
from attnkit.ops.transforms import transform_active

# With few query rows (decode, speculative verification), folding the query group into
# the rows beats torch's `enable_gqa` on CPU (batch 8, 32/8 heads, 4k context: 20 ms vs
# 36 ms on a 2-core machine; benchmarks/attention.py measures it). Long prefills gain
# nothing from folding and would need a G-times taller dense mask.
FOLD_MAX_ROWS = 64


class SdpaBackend(Backend):
    """torch's fused kernels; any mask is passed as a dense boolean matrix."""

    name = "sdpa"

    def unsupported(self, p: AttentionProblem) -> str | None:
        return sdpa_limits(p)

    def run(self, p: AttentionProblem) -> tuple[Tensor, None]:
        q, k, v = p.q, p.k, p.v
        is_causal = p.mask == causal() and p.n_q == p.n_k and p.q_offset == 0
        allowed = None
        if p.mask is not None and not is_causal:
            allowed = p.mask.dense(p.n_q, p.n_k, p.q_offset, device=q.device)
            k, v = zero_unseen_keys(k, v, allowed)

        fold = p.group > 1 and p.n_q * p.group <= FOLD_MAX_ROWS and not is_causal
        if fold:
            q = fold_groups(q, p.kv_heads)
            if allowed is not None:
                allowed = allowed.repeat(1, 1, p.group, 1)  # folded rows are group-major
        # torch's fused kernels have no forward-mode AD and no vmap batching rule (torch
        # falls back to a loop); its math kernel, plain ops, has both.
        kernels = sdpa_kernel(SDPBackend.MATH) if transform_active() else nullcontext()
        with kernels:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=allowed,
                is_causal=is_causal,
                scale=p.scale,
                enable_gqa=p.group > 1 and not fold,
            )
        if allowed is not None:
            # Rows that see no key must be 0; torch's math kernel (float64) gives NaN there.
            out = out.masked_fill(~allowed.any(-1, keepdim=True), 0)
        return (unfold_groups(out, p.heads) if fold else out), None


def sdpa_limits(p: AttentionProblem) -> str | None:
    """What torch SDPA cannot do for `p` (backends built on it share these limits)."""
    if p.return_lse:
        return "torch SDPA does not return the log-sum-exp (use 'tiled')"
    if p.softcap is not None:
        return "torch SDPA has no softcap (use 'tiled')"
    return None
