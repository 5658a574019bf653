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
from attnkit.ops.backends.base import Backend, get_backend
from attnkit.ops.masks import padding_lengths
from attnkit.ops.problem import AttentionProblem


class CppDecodeBackend(Backend):
    """The fused C++ decode kernel; one query row per sequence, CPU tensors."""

    name = "cpp_decode"

    def unsupported(self, p: AttentionProblem) -> str | None:
        if p.n_q != 1:
            return f"it serves one query row per sequence (decode), got {p.n_q}"
        if p.softcap is not None:
            return "the decode kernel has no softcap (use 'tiled')"
        limits = cpu_decode.request_limits(p.q, p.k, p.v)
        return limits if limits is not None else cpu_decode.cpu_decode_unavailable_reason()

    def run(self, p: AttentionProblem) -> tuple[Tensor, Tensor | None]:
        lengths = None
        if p.mask is not None:
            lengths = key_prefix_lengths(p)
            if lengths is None:  # not a prefix per sequence: torch's kernel takes any mask
                return get_backend("sdpa" if not p.return_lse else "tiled").run(p)
        out, lse = cpu_decode.decode_contiguous(p.q, p.k, p.v, lengths, p.scale)
        return out, (lse if p.return_lse else None)


def key_prefix_lengths(p: AttentionProblem) -> Tensor | None:
    """`(batch,)` keys each sequence's one query row sees, if they are its first keys."""
    lengths = padding_lengths(p.mask)  # a ragged decode step's mask says so directly
    if lengths is not None:
        return lengths.to(p.q.device).expand(p.batch)
    allowed = p.mask.dense(1, p.n_k, p.q_offset, device=p.q.device)  # (B or 1, 1, 1, n_k)
    allowed = allowed.view(-1, p.n_k).expand(p.batch, p.n_k)
    lengths = allowed.sum(-1)
    prefix = torch.arange(p.n_k, device=p.q.device) < lengths.unsqueeze(-1)
    return lengths if torch.equal(prefix, allowed) else None
