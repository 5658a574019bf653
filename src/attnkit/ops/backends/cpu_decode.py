"""`cpp_decode`: one query row per sequence on CPU, through the fused C++ decode kernel.

A decode step's attention reads every cached K/V byte for a single query row, so its speed
is the memory bandwidth. The kernel (`attnkit.ops.cpu_decode`) streams each K/V row once
for the whole GQA query group, in place through the cache's strides. It takes a key prefix
per sequence (`lengths`) and a sliding window with sinks: no mask, a mask that lets each
sequence see its first keys (the key padding of a ragged batch), or `sliding_window(W)`
(`| sinks(S)`), which it reads as the last W keys up to the query's position (and the first
S); other masks run on torch SDPA instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops import cpu_decode
from attnkit.ops.backends.base import Backend, get_backend
from attnkit.ops.masks import padding_lengths, window_and_sinks
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
        lengths, window, sinks = None, None, 0
        seen = window_and_sinks(p.mask)
        if seen is not None and 0 <= p.q_offset < p.n_k:  # the query at key position q_offset
            window, sinks = seen
            if p.q_offset + 1 < p.n_k:  # keys after it are in its future
                lengths = torch.full((p.batch,), p.q_offset + 1, device=p.q.device)
        elif p.mask is not None:
            lengths = key_prefix_lengths(p)
            if lengths is None:  # not a prefix per sequence: torch's kernel takes any mask
                return get_backend("sdpa" if not p.return_lse else "tiled").run(p)
        out, lse = cpu_decode.decode_contiguous(
            p.q, p.k, p.v, lengths, p.scale, window=window, sinks=sinks
        )
        return out, (lse if p.return_lse else None)


def plain_decode(
    q: object, k: object, v: object, scale: object, return_lse: bool
) -> tuple[Tensor, Tensor | None] | None:
    """`attention()`'s short way for the call a decode loop makes most: one query row per
    sequence, K/V of at least one key, valid CPU tensors the kernel takes, no mask, softcap
    or offset, `scale` None or a positive float. Answers as the full path would (out, and
    lse if asked); None for any other call, valid or not, which then takes the full path
    (its checks name what is wrong), and None while a replacement of `cpp_decode` is
    registered. The full path's Python (the problem's checks, the backend's choice) cost 5
    us a call hot and ~30 us from cold caches, on a kernel call of 5-30 us; the tensors'
    checks run in the kernel module (`try_decode`), as the same checks in Python cost ~25 us
    from cold caches."""
    if not (type(q) is Tensor and type(k) is Tensor and type(v) is Tensor):
        return None  # subclasses (parameters, fake tensors) take the full path
    if type(get_backend(CppDecodeBackend.name)) is not CppDecodeBackend:
        return None  # replaced in the registry (`register(..., replace=True)`): `auto` runs that
    module, scale = cpu_decode.short_way_kernel(q), cpu_decode.kernel_scale(scale)
    if module is None or scale is None:
        return None
    answer = module.try_decode(q, k, v, scale)
    if answer is None:
        return None
    out, lse = answer
    return out, (lse if return_lse else None)


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
