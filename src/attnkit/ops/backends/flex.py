"""torch FlexAttention (torch >= 2.5): our mask predicates become its `mask_mod`.

Compiled on CUDA, where it generates a fused block-sparse kernel. On CPU it runs eagerly
(unfused, for correctness checks): compiling there takes about a minute per shape, so
`auto` never picks it on CPU. Like the other backends, keys that no query may see are
zeroed first (found a chunk of rows at a time), so NaN stored there cannot leak.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from attnkit.ops.backends.base import Backend
from attnkit.ops.backends.common import unseen_keys, zero_keys
from attnkit.ops.problem import AttentionProblem

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: the backend does not register
    flex_attention = None
try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch < 2.9 returns the lse through `return_lse=True`
    AuxRequest = None

BLOCK = 128


class FlexBackend(Backend):
    """FlexAttention with the mask as `mask_mod` and softcap as `score_mod`."""

    name = "flex"

    def __init__(self) -> None:
        self._compiled = None

    def unsupported(self, p: AttentionProblem) -> str | None:
        if p.q.dtype == torch.float64 and p.q.device.type == "cuda":
            return "compiled FlexAttention does not support float64"
        wants_grad = p.q.requires_grad or p.k.requires_grad or p.v.requires_grad
        if wants_grad and p.q.device.type == "cpu":
            return "FlexAttention has no backward pass on CPU (inputs require grad)"
        return None

    def _kernel(self, device: torch.device):
        if device.type != "cuda":
            return flex_attention
        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def run(self, p: AttentionProblem) -> tuple[Tensor, Tensor]:
        block_mask = None
        k, v = p.k, p.v
        if p.mask is not None:
            k, v = zero_keys(k, v, unseen_keys(p))
            mask, geo = p.mask, p.geometry

            def mask_mod(b, h, q_idx, kv_idx):
                return mask.allowed(b, q_idx, kv_idx, geo)

            block_mask = create_block_mask(
                mask_mod, mask.batch_size, None, p.n_q, p.n_k, device=p.q.device, BLOCK_SIZE=BLOCK
            )
        score_mod = None
        if p.softcap is not None:
            cap = p.softcap

            def score_mod(score, b, h, q_idx, kv_idx):
                return cap * torch.tanh(score / cap)

        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*flex_attention called without torch.compile"
            )
            out, lse = self._kernel(p.q.device)(
                p.q,
                k,
                v,
                score_mod=score_mod,
                block_mask=block_mask,
                scale=p.scale,
                enable_gqa=p.group > 1,
                **({"return_aux": AuxRequest(lse=True)} if AuxRequest else {"return_lse": True}),
            )
        return out, lse.lse if AuxRequest else lse
