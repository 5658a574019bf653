"""The oracle: softmax(QKᵀ·scale)V materialised in the inputs' dtype (use float64)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.ops.backends.base import Backend
from attnkit.ops.backends.common import zero_unseen_keys
from attnkit.ops.problem import AttentionProblem, lse_dtype


class ReferenceBackend(Backend):
    """Plain and obviously right: expands GQA heads, builds the dense mask, O(N²) memory."""

    name = "reference"

    def run(self, p: AttentionProblem) -> tuple[Tensor, Tensor]:
        k = p.k.repeat_interleave(p.group, dim=1)
        v = p.v.repeat_interleave(p.group, dim=1)
        allowed = None
        if p.mask is not None:
            allowed = p.mask.dense(p.n_q, p.n_k, p.q_offset, device=p.q.device)
            k, v = zero_unseen_keys(k, v, allowed)
        scores = (p.q @ k.transpose(-1, -2)) * p.scale
        if p.softcap is not None:
            scores = p.softcap * torch.tanh(scores / p.softcap)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        # A row that sees nothing has lse -inf; subtracting 0 instead gives weights exp(-inf)=0.
        weights = torch.exp(scores - torch.where(torch.isinf(lse), 0, lse).unsqueeze(-1))
        return weights @ v, lse.to(lse_dtype(p.q.dtype))
