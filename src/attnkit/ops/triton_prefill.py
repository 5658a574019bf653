"""Triton FlashAttention forward for causal, sliding-window and sink masks (GPU prefill).

Grid: (query tiles, batch · heads). A program holds `BLOCK_M` query rows of one head and
walks only the keys its rows can see, `BLOCK_N` at a time, with an online softmax (running
max, running sum, rescaled accumulator) in float32, base 2 (the scale carries log2 e):

- no mask: every key;
- causal, `sliding_window(W)`, `sliding_window(W) | sinks(S)`: the sink keys before the
  band, then the band, from the first row's oldest visible key to the last row's own
  position. A sliding window thus costs O(N·W) and causal about half of the dense work.

Inside a tile each (row, key) pair is masked by position (query row i sits at
`q_offset + i`), so tiles need not align with the band. A row that sees no key writes zeros
and lse -inf. K/V heads are shared by query groups through the index `head // group`:
grouped K/V are never repeated in memory.

Importing this module needs `triton`; running it needs CUDA tensors, or CPU tensors with
`TRITON_INTERPRET=1` set before triton is imported (how the tests run it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnkit.ops.triton_online import LOG2E, dot, finish_softmax, softmax_step


@triton.jit
def _attend_tile(
    q,
    m,
    l_sum,
    acc,
    K,
    V,
    n0,
    stop,
    pos,
    row_ok,
    stride_kn,
    stride_vn,
    qk_scale,
    window,
    n_sinks,
    LAYOUT,
    layout_cols,
    layout_block,
    MASKED: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EXACT: tl.constexpr,
):
    """Keys [n0, min(n0 + BLOCK_N, stop)) folded into one row tile's softmax state."""
    n = n0 + tl.arange(0, BLOCK_N)
    key_ok = n < stop
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = tl.load(
        K + n[:, None] * stride_kn + d[None, :],
        mask=key_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    s = dot(q, tl.trans(k), EXACT)
    visible = key_ok[None, :]
    if MASKED:  # causal, and within the window or among the sinks
        behind = pos[:, None] - n[None, :]
        visible = visible & (behind >= 0) & ((behind < window) | (n[None, :] < n_sinks))
    if SPARSE:  # the layout's block of (position, key)
        block_of = tl.maximum(pos, 0)[:, None] // layout_block * layout_cols
        kept = tl.load(
            LAYOUT + block_of + (n // layout_block)[None, :],
            mask=row_ok[:, None] & key_ok[None, :],
            other=0,
        )
        visible = visible & (kept != 0) & (pos[:, None] >= 0)
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new, l_sum, alpha, p = softmax_step(m, l_sum, s)
    v_ok = key_ok
    if SPARSE:  # a kept tile may hold keys no row sees: never read them (0 · NaN is NaN)
        v_ok = v_ok & (tl.max(visible.to(tl.int32), 0) > 0)
    v = tl.load(
        V + n[:, None] * stride_vn + dv[None, :],
        mask=v_ok[:, None] & (dv[None, :] < V_DIM),
        other=0.0,
    )
    return m_new, l_sum, acc * alpha[:, None] + dot(p, v, EXACT)


@triton.jit
def _prefill_forward(
    Q,
    K,
    V,
    OUT,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_lb,
    stride_lh,
    heads,
    n_q,
    n_k,
    q_offset,
    qk_scale,
    window,
    n_sinks,
    TILES,
    COUNTS,
    stride_tb,
    stride_tq,
    stride_cb,
    LAYOUT,
    stride_layout_b,
    layout_cols,
    layout_block,
    GROUP: tl.constexpr,
    MASKED: tl.constexpr,
    SPARSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    EXACT: tl.constexpr,
):
    tile = tl.program_id(0)
    # int64: b * stride passes 2^31 elements on large batches of long sequences
    b = (tl.program_id(1) // heads).to(tl.int64)
    h = tl.program_id(1) % heads
    kv_head = h // GROUP
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_q
    pos = q_offset + rows
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + d[None, :],
        mask=row_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    )
    K += b * stride_kb + kv_head * stride_kh
    V += b * stride_vb + kv_head * stride_vh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if SPARSE:  # the key tiles the mask's block summary lists for this query tile
        TILES += b * stride_tb + tile * stride_tq
        LAYOUT += b * stride_layout_b
        n_tiles = tl.load(COUNTS + b * stride_cb + tile)
    else:  # the sinks before the band, then the band (no mask: all keys)
        lo, hi, sink_end = 0, n_k, 0
        if MASKED:
            first = q_offset + tile * BLOCK_M
            last = tl.minimum(first + BLOCK_M, q_offset + n_q) - 1
            hi = tl.maximum(tl.minimum(n_k, last + 1), 0)
            lo = tl.minimum(tl.maximum(0, first - window + 1), hi)
            sink_end = tl.minimum(n_sinks, lo)
        sink_tiles = tl.cdiv(sink_end, BLOCK_N)
        n_tiles = sink_tiles + tl.cdiv(hi - lo, BLOCK_N)
    for t in range(0, n_tiles):
        if SPARSE:
            n0 = tl.load(TILES + t) * BLOCK_N
            stop = n_k
        else:
            in_sinks = t < sink_tiles
            n0 = tl.where(in_sinks, t * BLOCK_N, lo + (t - sink_tiles) * BLOCK_N)
            stop = tl.where(in_sinks, sink_end, hi)
        m, l_sum, acc = _attend_tile(
            q,
            m,
            l_sum,
            acc,
            K,
            V,
            n0,
            stop,
            pos,
            row_ok,
            stride_kn,
            stride_vn,
            qk_scale,
            window,
            n_sinks,
            LAYOUT,
            layout_cols,
            layout_block,
            MASKED,
            SPARSE,
            BLOCK_N,
            HEAD_DIM,
            V_DIM,
            BLOCK_D,
            BLOCK_DV,
            EXACT,
        )
    out, lse = finish_softmax(m, l_sum, acc)
    tl.store(
        OUT + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dv[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & (dv[None, :] < V_DIM),
    )
    tl.store(LSE + b * stride_lb + h * stride_lh + rows, lse, mask=row_ok)


# Launch settings: FlashAttention-2's usual forward tiles; float32 tiles are twice the
# bytes, so they take 32 keys (and one stage past head dim 128) to stay in shared memory.
# Compiled for sm_90 (tests/ops/test_triton_compile.py), the kernel then asks for at most
# 74 KB (99 KB is the least a recent GPU offers), float32 past head dim 128 for 107 KB
# (A100, H100). Not yet tuned on a GPU (no device was lent when this kernel was written).
BLOCK_M = 64
BLOCK_N = 64
NUM_WARPS = 4
NUM_STAGES = 2
FLOAT32_WIDE_SHARED_BYTES = 106_752  # float32, head dim 256: the largest request


def launch_settings(dtype: torch.dtype, head_dim: int) -> dict[str, int]:
    """block_m, block_n, num_warps and num_stages for inputs of this dtype and head dim."""
    if dtype != torch.float32:
        return dict(block_m=BLOCK_M, block_n=BLOCK_N, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    stages = NUM_STAGES if head_dim <= 128 else 1
    block_n = BLOCK_N if head_dim <= 64 else 32
    return dict(block_m=BLOCK_M, block_n=block_n, num_warps=NUM_WARPS, num_stages=stages)


def triton_prefill(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    q_offset: int,
    causal: bool,
    window: int | None = None,
    n_sinks: int = 0,
    sparse: tuple[Tensor, Tensor, Tensor, int] | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Output `(batch, heads, n_q, v_dim)` in q's dtype and lse `(batch, heads, n_q)` float32.

    q `(batch, heads, n_q, d)`, k `(batch, kv_heads, n_k, d)`, v `(batch, kv_heads, n_k,
    v_dim)`, each contiguous in its last dim. `causal` with `window=None` is plain causal;
    `window` (keys seen, the current one included) and `n_sinks` need `causal`. `sparse`
    adds a block layout: `(tiles, counts, layout, layout_block)` with `layout` int8
    `(batch or 1, q_blocks, k_blocks)` indexed by position // layout_block, and `tiles`
    `(batch or 1, q tiles, max)` int32 the key tiles (of `block_n` keys) each query tile of
    `block_m` rows visits, `counts` `(batch or 1, q tiles)` how many of them; without it,
    the tiles are the band of the causal / window mask. Launch settings left None come
    from `launch_settings`.
    """
    b, h, n_q, d = q.shape
    kv_heads, n_k, dv = k.shape[1], k.shape[2], v.shape[3]
    chosen = launch_settings(q.dtype, max(d, dv))
    block_m, block_n = block_m or chosen["block_m"], block_n or chosen["block_n"]
    num_warps = num_warps or chosen["num_warps"]
    num_stages = num_stages or chosen["num_stages"]
    out = torch.empty(b, h, n_q, dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    # a plain causal mask is a window wider than any distance between a query and a key
    span = window if window is not None else n_k + max(q_offset, 0) + n_q + 1
    if sparse is None:  # unused pointers: any int32 tensor will do
        tiles = counts = lse
        layout, layout_block = lse, 1
    else:
        tiles, counts, layout, layout_block = sparse
    per_sequence = sparse is not None and tiles.shape[0] > 1
    grid = (triton.cdiv(n_q, block_m), b * h)
    _prefill_forward[grid](
        q,
        k,
        v,
        out,
        lse,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        h,
        n_q,
        n_k,
        q_offset,
        scale * LOG2E,
        span,
        n_sinks,
        tiles,
        counts,
        tiles.stride(0) if per_sequence else 0,
        tiles.stride(1) if sparse is not None else 0,
        counts.stride(0) if per_sequence else 0,
        layout,
        layout.stride(0) if sparse is not None and layout.shape[0] > 1 else 0,
        layout.shape[-1] if sparse is not None else 0,
        layout_block,
        GROUP=h // kv_heads,
        MASKED=causal,
        SPARSE=sparse is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=d,
        V_DIM=dv,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
        EXACT=q.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out, lse
