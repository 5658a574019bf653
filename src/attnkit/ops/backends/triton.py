"""`triton`: the FlashAttention forward in Triton, for causal, window, sink and block masks.

The kernel (`attnkit.ops.triton_prefill`) visits only the key tiles a query tile can see,
so a window costs O(N·W). It serves no mask, `causal()`, `sliding_window(W)`,
`sliding_window(W) | sinks(S)`, and `block_sparse(layout, B)` alone or and-ed with
`causal()` or `sliding_window(W)` (the key tiles to visit then come from the mask's block
summary, computed on the host), at any `q_offset` (chunked prefill against a cache),
float32 / float16 / bfloat16, returning the log-sum-exp when asked; CUDA tensors, or CPU
tensors under Triton's interpreter (`TRITON_INTERPRET=1`, how CI runs it). It has no
backward pass and no softcap. `auto` does not pick it yet: it has not been timed on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops.backends.base import Backend
from attnkit.ops.masks import causal, split_block_sparse, window_and_sinks
from attnkit.ops.problem import AttentionProblem
from attnkit.ops.triton_support import triton_unavailable

try:  # optional: CUDA kernels, or the interpreter on CPU
    from attnkit.ops.triton_prefill import (
        FLOAT32_WIDE_SHARED_BYTES,
        launch_settings,
        triton_prefill,
    )
except ImportError:  # pragma: no cover - triton is a dev dependency
    triton_prefill = launch_settings = FLOAT32_WIDE_SHARED_BYTES = None

MAX_HEAD_DIM = 256  # the widest tiles whose shared memory a GPU holds (launch_settings)


class TritonBackend(Backend):
    """Triton FlashAttention forward (GQA by index, band-limited key loop)."""

    name = "triton"

    def __init__(self, block_m: int | None = None, block_n: int | None = None) -> None:
        self.tiles = {
            name: value
            for name, value in (("block_m", block_m), ("block_n", block_n))
            if value is not None
        }
        for name, value in self.tiles.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 16:
                raise ValueError(f"{name} must be an integer >= 16 (tl.dot's least), got {value!r}")
            if value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")

    def unsupported(self, p: AttentionProblem) -> str | None:
        reason = triton_unavailable(p.q, triton_prefill is not None, (p.q, p.k, p.v))
        if reason is not None:
            return reason
        if p.softcap is not None:
            return "the triton kernel has no softcap (use 'tiled')"
        if max(p.q.shape[-1], p.v.shape[-1]) > MAX_HEAD_DIM:
            return (
                f"the triton kernel takes head dims up to {MAX_HEAD_DIM}, got q head_dim "
                f"{p.q.shape[-1]} and v head_dim {p.v.shape[-1]}"
            )
        wide = p.q.dtype == torch.float32 and max(p.q.shape[-1], p.v.shape[-1]) > 128
        if wide and p.q.is_cuda:
            offered = torch.cuda.get_device_properties(p.q.device).shared_memory_per_block_optin
            if offered < FLOAT32_WIDE_SHARED_BYTES:
                return (
                    f"float32 with head dims past 128 needs {FLOAT32_WIDE_SHARED_BYTES} bytes "
                    f"of shared memory per block and this GPU offers {offered}: use bfloat16 "
                    "or float16"
                )
        if _layout(p.mask) is None:
            return (
                "it serves no mask, causal(), sliding_window(W), sliding_window(W) | sinks(S) "
                f"and block_sparse(...) alone or & causal() or a window; got {p.mask!r}"
            )
        return None

    def run(self, p: AttentionProblem) -> tuple[Tensor, Tensor | None]:
        is_causal, window, n_sinks, block = _layout(p.mask)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (p.q, p.k, p.v))
        chosen = launch_settings(p.q.dtype, max(p.q.shape[-1], p.v.shape[-1]))
        tiles = {name: chosen[name] for name in ("block_m", "block_n")} | self.tiles
        sparse = None if block is None else _tile_lists(p, block, **tiles)
        out, lse = triton_prefill(
            q,
            k,
            v,
            scale=p.scale,
            q_offset=p.q_offset,
            causal=is_causal,
            window=window,
            n_sinks=n_sinks,
            sparse=sparse,
            **tiles,
        )
        return out, (lse if p.return_lse else None)


def _layout(mask) -> tuple[bool, int | None, int, tuple[Tensor, int] | None] | None:
    """(causal, window, sinks, (layout, block size) or None) of the masks the kernel
    serves, else None."""
    if mask is None:
        return False, None, 0, None
    if mask == causal():
        return True, None, 0, None
    band = window_and_sinks(mask)
    if band is not None:
        return True, *band, None
    sparse = split_block_sparse(mask)
    if sparse is None:
        return None
    other, layout, block_size = sparse
    rest = _layout(other)
    if rest is None or rest[2] or rest[3] is not None:  # sinks are an | : not a band here
        return None
    return rest[0], rest[1], 0, (layout, block_size)


def _tile_lists(p: AttentionProblem, block: tuple[Tensor, int], block_m: int, block_n: int):
    """(tiles, counts, layout, block size) for the kernel: per query tile of `block_m` rows,
    the key tiles of `block_n` keys the mask's block summary keeps, in order."""
    summary = p.mask.block_summary(p.n_q, p.n_k, block_m, block_n, p.q_offset, p.q.device)
    keep = summary.nonempty  # (batch or 1, q tiles, k tiles)
    counts = keep.sum(-1, dtype=torch.int32)
    widest = max(1, int(counts.max()))
    index = torch.arange(keep.shape[-1], device=keep.device, dtype=torch.int32)
    listed = torch.where(keep, index, keep.shape[-1]).sort(-1).values[..., :widest]
    layout, block_size = block
    # the kernel reads the layout as packed rows: any strides (a transposed layout) copy
    layout = layout.to(p.q.device, torch.int8).contiguous()
    return listed.contiguous(), counts.contiguous(), layout, block_size
