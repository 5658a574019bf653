"""`cpp_decode`: one query row per sequence on CPU, through the fused C++ decode kernel.

A decode step's attention reads every cached K/V byte for a single query row, so its speed
is the memory bandwidth. The kernel (`attnkit.ops.cpu_decode`) streams each K/V row once
for the whole GQA query group, in place through the cache's strides. It takes a key prefix
per sequence (`lengths`): no mask, or a mask that lets each sequence see its first keys
(the key padding of a ragged batch); other masks (windows in a ring buffer, sinks) run on
torch SDPA instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops import cpu_decode
from attnkit.ops.backends.base import Backend
from attnkit.ops.problem import AttentionProblem


class CppDecodeBackend(Backend):
    """The fused C++ decode kernel; one query row per sequence, CPU tensors."""

    name = "cpp_decode"

    def unsupported(self, p: AttentionProblem) -> str | None:
        if p.n_q != 1:
            return f"it serves one query row per sequence (decode), got {p.n_q}"
        if p.softcap is not None:
            return "the decode kernel has no softcap (use 'tiled')"
        if p.q.device.type != "cpu":
            return f"it runs on CPU tensors, got {p.q.device}"
        if p.q.dtype not in cpu_decode.DTYPES:
            return f"it takes float32, float64, bfloat16 or float16, got {p.q.dtype}"
        if torch.is_grad_enabled() and any(t.requires_grad for t in (p.q, p.k, p.v)):
            return "the decode kernel has no backward (run under torch.no_grad())"
        return cpu_decode.cpu_decode_unavailable_reason()

    def run(self, p: AttentionProblem) -> tuple[Tensor, Tensor | None]:
        lengths = None
        if p.mask is not None:
            lengths = key_prefix_lengths(p)
            if lengths is None:  # not a prefix per sequence: torch's kernel takes any mask
                from attnkit.ops.backends import get_backend

                return get_backend("sdpa" if not p.return_lse else "tiled").run(p)
        q = p.q[:, :, 0].contiguous()
        # (batch, kv_heads, n, d) read as a pool of `batch` blocks of n tokens, no copy
        k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (p.k, p.v))
        out, lse = cpu_decode.cpp_decode(
            q, k.transpose(1, 2), v.transpose(1, 2), None, lengths, p.scale, None
        )
        return out.unsqueeze(2), (lse.unsqueeze(2) if p.return_lse else None)


def key_prefix_lengths(p: AttentionProblem) -> Tensor | None:
    """`(batch,)` keys each sequence's one query row sees, if they are its first keys."""
    allowed = p.mask.dense(1, p.n_k, p.q_offset, device=p.q.device)  # (B or 1, 1, 1, n_k)
    allowed = allowed.view(-1, p.n_k).expand(p.batch, p.n_k)
    lengths = allowed.sum(-1)
    prefix = torch.arange(p.n_k, device=p.q.device) < lengths.unsqueeze(-1)
    return lengths if torch.equal(prefix, allowed) else None
