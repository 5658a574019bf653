"""`banded`: causal and sliding-window attention (optionally with sinks) on CPU.

A window mask keeps W keys per query; a dense kernel still reads all N. The C++ kernel
(csrc/banded_attention.cpp) gives each block of 32 query rows (16 with AVX2: two vectors'
lanes; a few positions x the GQA group, one row per lane) the W + positions - 1 keys they
need, and masks by position as it stores the scores: no mask tensor, no copy of K or V. A
causal mask is the window W = n_k, so the same kernel serves causal prefill, whole or in
chunks against a cache (where torch SDPA's `is_causal` cannot place the rows and needs a
dense mask). It serves `causal()`, `sliding_window(W)` and `sliding_window(W) | sinks(S)`
masks for float32 CPU inputs without autograd, with the queries inside the keys.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.ops.backends.base import Backend, get_backend
from attnkit.ops.cpp_build import load_kernel, unavailable_reason
from attnkit.ops.masks import Mask, causal, window_and_sinks
from attnkit.ops.problem import AttentionProblem
from attnkit.ops.transforms import kernel_refusal

SOURCE = "banded_attention.cpp"


class BandedBackend(Backend):
    """The C++ banded kernel for causal masks and sliding windows (+ sinks)."""

    name = "banded"

    def __init__(self, tile: int = 32) -> None:
        # tile: the most query positions a block holds; the kernel's BLOCK_ROWS lanes (32,
        # AVX2 16) hold BLOCK_ROWS // G of them, so only a smaller tile changes anything
        # (the tests use it to reach every edge of the blocking).
        self.tile = check_positive_int("tile", tile)

    def unsupported(self, p: AttentionProblem) -> str | None:
        if p.return_lse or p.softcap is not None:
            return "the banded kernel returns no log-sum-exp and has no softcap (use 'tiled')"
        if band_of(p.mask, p.n_k) is None:
            return (
                "it serves causal() and sliding_window(W) masks, optionally | sinks(S); "
                f"got {p.mask!r}"
            )
        if p.q.device.type != "cpu" or any(t.dtype != torch.float32 for t in (p.q, p.k, p.v)):
            return "the banded kernel takes float32 CPU tensors"
        reason = kernel_refusal("the banded kernel", p.q, p.k, p.v)
        if reason is not None:
            return reason
        if p.q_offset < 0 or p.q_offset + p.n_q > p.n_k:
            return (
                f"query rows must sit at key positions (q_offset {p.q_offset}, n_q {p.n_q}, "
                f"n_k {p.n_k})"
            )
        return unavailable_reason(SOURCE)

    def run(self, p: AttentionProblem) -> tuple[Tensor, None]:
        layout = band_of(p.mask, p.n_k)
        if layout is None:  # `attention` dropped a mask that hides nothing here: dense
            return get_backend("sdpa").run(p)
        window, n_sinks = layout
        q, k, v = (t.contiguous() for t in (p.q, p.k, p.v))
        module = load_kernel(SOURCE)
        out = module.banded_attention(q, k, v, window, n_sinks, p.q_offset, p.scale, self.tile)
        return out, None


def band_of(mask: Mask | None, n_k: int) -> tuple[int, int] | None:
    """`(W, S)`: the window and sink count the kernel computes `mask` with, or None."""
    if mask == causal():
        return max(n_k, 1), 0  # each query sees every key up to its own position
    return window_and_sinks(mask)
