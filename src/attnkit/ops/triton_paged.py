"""Triton split-K decode over a paged K/V pool, GQA folded (see `ops.paged_decode`).

Grid: (batch, kv_heads, splits). A program loads its KV head's whole query group as the rows
of a tile (padded to 16, the smallest `tl.dot` shape), walks its slice of the context
`BLOCK_N` tokens at a time, looking each token's block up in the block table, and keeps an
online softmax (running max, running sum, rescaled accumulator) in float32. It writes a
partial output and its log-sum-exp; a second kernel merges the splits (one launch, not a
chain of torch ops: at decode's microsecond scale launches are the cost). A split past a
sequence's end writes zeros and -inf, which the merge weighs 0.

Importing this module needs `triton`; running it needs CUDA tensors, or CPU tensors with
`TRITON_INTERPRET=1` set before triton is imported (how the tests run it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnkit.ops.triton_online import dot


@triton.jit
def _paged_decode_split(
    Q,
    K,
    V,
    TABLE,
    LENGTHS,
    OUT,
    LSE,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kp,
    stride_kh,
    stride_vn,
    stride_vp,
    stride_vh,
    stride_tb,
    stride_os,
    stride_ob,
    stride_oh,
    stride_ls,
    stride_lb,
    scale,
    tokens_per_split,
    window_splits,
    WINDOW,
    SINKS,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PAGE: tl.constexpr,
    EXACT: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(LENGTHS + b)
    # With a window (WINDOW > 0) the splits below window_splits cover the last WINDOW tokens,
    # and one more covers the first SINKS before them; tokens in between are never read.
    window_start = tl.where(WINDOW > 0, tl.maximum(length - WINDOW, 0), 0)
    start = window_start + split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, length)
    sinks = split >= window_splits
    start = tl.where(sinks, 0, start)
    end = tl.where(sinks, tl.minimum(SINKS, window_start), end)

    rows = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + rows
    row_ok = rows < GROUP
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        block = tl.load(TABLE + b * stride_tb + n // PAGE, mask=valid, other=0).to(tl.int64)
        slot = n % PAGE
        k = tl.load(
            K
            + block[:, None] * stride_kn
            + slot[:, None] * stride_kp
            + kv_head * stride_kh
            + d[None, :],
            mask=valid[:, None] & (d[None, :] < HEAD_DIM),
            other=0.0,
        )
        s = dot(q, tl.trans(k), EXACT)
        s = tl.where(valid[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: n0 < end, so token n0 is valid
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(
            V
            + block[:, None] * stride_vn
            + slot[:, None] * stride_vp
            + kv_head * stride_vh
            + dv[None, :],
            mask=valid[:, None] & (dv[None, :] < V_DIM),
            other=0.0,
        )
        acc = acc * alpha[:, None] + dot(p, v, EXACT)
        m = m_new
    seen = l_sum > 0
    out = acc / tl.where(seen, l_sum, 1.0)[:, None]
    lse = tl.where(seen, m + tl.log(tl.where(seen, l_sum, 1.0)), float("-inf"))
    tl.store(
        OUT + split * stride_os + b * stride_ob + heads[:, None] * stride_oh + dv[None, :],
        out,
        mask=row_ok[:, None] & (dv[None, :] < V_DIM),
    )
    tl.store(LSE + split * stride_ls + b * stride_lb + heads, lse, mask=row_ok)


@triton.jit
def _merge_splits(
    OUT_PARTS,
    LSE_PARTS,
    OUT,
    LSE,
    splits,
    stride_os,
    stride_ls,
    V_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """One program per (sequence, head): softmax-weighted sum of its splits by their lse."""
    row = tl.program_id(0)  # flat (batch, head) index
    s = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(LSE_PARTS + s * stride_ls + row, mask=s < splits, other=float("-inf"))
    top = tl.max(lse, 0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - safe_top)  # 0 for empty splits
    total = tl.sum(w, 0)
    parts = tl.load(
        OUT_PARTS + s[:, None] * stride_os + row * V_DIM + dv[None, :],
        mask=(s[:, None] < splits) & (dv[None, :] < V_DIM),
        other=0.0,
    )
    seen = total > 0  # False only when no split saw a key (length 0)
    safe_total = tl.where(seen, total, 1.0)
    out = tl.sum(parts * w[:, None], 0) / safe_total
    tl.store(OUT + row * V_DIM + dv, out.to(OUT.dtype.element_ty), mask=dv < V_DIM)
    tl.store(LSE + row, tl.where(seen, safe_top + tl.log(safe_total), float("-inf")))


# Launch settings, from a sweep on an H100 (benchmarks/gpu_paged_decode.py --sweep): the
# best mean over batch 1-32 and contexts 1k-16k.
BLOCK_N = 64  # tokens per tile
NUM_WARPS = 8
NUM_STAGES = 4
PROGRAMS = 528  # programs to aim for: 8 per SM on 132 SMs keeps enough loads in flight
MIN_SPLIT = 256  # tokens: shorter slices cost more in merging than they save


def default_splits(batch: int, kv_heads: int, longest: int, programs: int = PROGRAMS) -> int:
    """Context slices per (sequence, KV head): about `programs` programs in all, but no slice
    shorter than `MIN_SPLIT` tokens."""
    wanted = -(-programs // max(1, batch * kv_heads))
    return max(1, min(wanted, -(-longest // MIN_SPLIT)))


def split_plan(longest: int, wanted: int, block_n: int) -> tuple[int, int]:
    """(splits, tokens per split) for `wanted` context slices of whole `block_n` tiles, none
    starting past `longest` (the longest sequence, or an upper bound on it)."""
    per_split = max(block_n, -(-max(longest, 1) // wanted))
    per_split = -(-per_split // block_n) * block_n  # whole tiles
    return -(-max(longest, 1) // per_split), per_split


def merge_splits(parts: Tensor, part_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """Write into `out` (batch, heads, dim) and `lse` (batch, heads) the softmax-weighted sum
    of the float32 partial outputs `parts` (splits, batch, heads, dim) by their `part_lse`."""
    splits, b, h, dim = parts.shape
    _merge_splits[(b * h,)](
        parts,
        part_lse,
        out,
        lse,
        splits,
        parts.stride(0),
        part_lse.stride(0),
        V_DIM=dim,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
        BLOCK_DV=max(16, triton.next_power_of_2(dim)),
    )


def triton_paged_decode(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    block_table: Tensor,
    lengths: Tensor,
    scale: float,
    num_splits: int | None,
    *,
    window: int | None = None,
    sinks: int = 0,
    longest: int | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    programs: int = PROGRAMS,
) -> tuple[Tensor, Tensor]:
    """Attention output (batch, heads, v_dim) in q's dtype and lse (batch, heads) float32.

    `window`, `sinks`: each query sees only its sequence's last `window` tokens and first
    `sinks` (`paged_decode`'s). `longest`: an upper bound on `lengths` (default: the block
    table's capacity, which needs no device sync); it only sets how the context is split.
    """
    b, h, d = q.shape
    page, kv_heads, dv = k_pool.shape[1], k_pool.shape[2], v_pool.shape[3]
    if longest is None:
        longest = block_table.shape[1] * page
    seen = longest if window is None else min(longest, window)  # tokens the splits cover
    splits, per_split = split_plan(
        seen, num_splits or default_splits(b, kv_heads, seen, programs), block_n
    )
    sink_splits = int(window is not None and sinks > 0)
    out = torch.empty(b, h, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, device=q.device, dtype=torch.float32)
    if b == 0:
        return out, lse
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim for the triton backend")
    q = q.contiguous()
    table = block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32)
    table = table.contiguous()
    lengths32 = lengths if lengths.dtype == torch.int32 else lengths.to(torch.int32)
    lengths32 = lengths32.to(q.device).contiguous()
    # every program writes its slot, empty splits included: no zero-fill needed
    parts = torch.empty(splits + sink_splits, b, h, dv, device=q.device, dtype=torch.float32)
    part_lse = torch.empty(splits + sink_splits, b, h, device=q.device, dtype=torch.float32)
    _paged_decode_split[(b, kv_heads, splits + sink_splits)](
        q,
        k_pool,
        v_pool,
        table,
        lengths32,
        parts,
        part_lse,
        q.stride(0),
        q.stride(1),
        k_pool.stride(0),
        k_pool.stride(1),
        k_pool.stride(2),
        v_pool.stride(0),
        v_pool.stride(1),
        v_pool.stride(2),
        table.stride(0),
        parts.stride(0),
        parts.stride(1),
        parts.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        scale,
        per_split,
        splits,
        window or 0,
        sinks,  # read only by the sinks' split, launched only beside a window
        GROUP=h // kv_heads,
        BLOCK_G=max(16, triton.next_power_of_2(h // kv_heads)),
        BLOCK_N=block_n,
        HEAD_DIM=d,
        V_DIM=dv,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        PAGE=page,
        EXACT=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    merge_splits(parts, part_lse, out, lse)
    return out, lse
