"""Triton MLA decode in absorbed form: one query per sequence over the latent cache.

Absorbed MLA (DeepSeek-V2 sec. 2.1.2) scores head h against token t as
`q_latent_h · c_t + q_rope_h · k_rope_t` and outputs `sum_t p_t c_t` in latent space (the
caller applies W_uv). Every head reads the same latent c: it is MQA with a key of
`kv_rank + rope_dim` values whose value is the key's first `kv_rank` values. The kernel
loads each tile of latents once and uses it twice, for the scores and for the output, and
never builds the concatenated `[c ; k_rope]` key a generic attention call needs (a copy of
the whole cache per layer and step).

Grid: (batch, head tiles, splits). A program holds `BLOCK_H` heads of one sequence as the
rows of its tiles and walks one slice of the context `BLOCK_N` tokens at a time with an
online softmax in float32; the slices merge by log-sum-exp (`triton_paged.merge_splits`,
FlashDecoding). Importing this module needs `triton`; running it needs CUDA tensors, or
CPU tensors with `TRITON_INTERPRET=1` set before triton is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from attnkit.ops.triton_online import LOG2E, dot, finish_softmax, softmax_step
from attnkit.ops.triton_paged import default_splits, merge_splits, split_plan


@triton.jit
def _latent_decode_split(
    Q_LAT,
    Q_ROPE,
    LATENT,
    K_ROPE,
    LENGTHS,
    OUT,
    LSE,
    stride_qb,
    stride_qh,
    stride_rb,
    stride_rh,
    stride_cb,
    stride_cn,
    stride_kb,
    stride_kn,
    stride_os,
    stride_ob,
    stride_oh,
    stride_ls,
    stride_lb,
    heads,
    qk_scale,
    tokens_per_split,
    RANK: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_P: tl.constexpr,
    EXACT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # b * stride passes 2^31 elements on long caches
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    length = tl.load(LENGTHS + b)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, length)
    h_ok = h < heads
    r = tl.arange(0, BLOCK_R)
    p_dim = tl.arange(0, BLOCK_P)
    q_lat = tl.load(
        Q_LAT + b * stride_qb + h[:, None] * stride_qh + r[None, :],
        mask=h_ok[:, None] & (r[None, :] < RANK),
        other=0.0,
    )
    q_rope = tl.load(
        Q_ROPE + b * stride_rb + h[:, None] * stride_rh + p_dim[None, :],
        mask=h_ok[:, None] & (p_dim[None, :] < ROPE),
        other=0.0,
    )
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        valid = n < end
        c = tl.load(
            LATENT + b * stride_cb + n[:, None] * stride_cn + r[None, :],
            mask=valid[:, None] & (r[None, :] < RANK),
            other=0.0,
        )
        k_rope = tl.load(
            K_ROPE + b * stride_kb + n[:, None] * stride_kn + p_dim[None, :],
            mask=valid[:, None] & (p_dim[None, :] < ROPE),
            other=0.0,
        )
        s = dot(q_lat, tl.trans(c), EXACT) + dot(q_rope, tl.trans(k_rope), EXACT)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m, l_sum, alpha, p = softmax_step(m, l_sum, s)
        acc = acc * alpha[:, None] + dot(p, c, EXACT)
    out, lse = finish_softmax(m, l_sum, acc)
    tl.store(
        OUT + split * stride_os + b * stride_ob + h[:, None] * stride_oh + r[None, :],
        out,
        mask=h_ok[:, None] & (r[None, :] < RANK),
    )
    tl.store(LSE + split * stride_ls + b * stride_lb + h, lse, mask=h_ok)


# Launch settings: 16 heads per program (the least tl.dot rows). 32-token tiles keep a
# (16, 512) accumulator and a (32, 512) latent tile per program in 59 KB of shared memory in
# bfloat16; float32 takes 16-token tiles and one stage (74 KB; 32 tokens asked for 113 KB,
# more than many GPUs offer). Sizes from compiling for sm_90; not yet tuned on a GPU.
BLOCK_H = 16
BLOCK_N = 32
NUM_WARPS = 4
NUM_STAGES = 2


def triton_latent_decode(
    q_latent: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    k_rope: Tensor,
    lengths: Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_h: int = BLOCK_H,
    block_n: int | None = None,
    num_warps: int = NUM_WARPS,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Latent-space output `(batch, heads, kv_rank)` in q's dtype, lse `(batch, heads)` float32.

    q_latent `(batch, heads, kv_rank)`, q_rope `(batch, heads, rope_dim)`, latent `(batch,
    kv_len, kv_rank)`, k_rope `(batch, kv_len, rope_dim)`, each contiguous in its last dim;
    lengths `(batch,)` int: sequence b attends to its first `lengths[b]` tokens.
    """
    b, h, rank = q_latent.shape
    wide = q_latent.dtype == torch.float32
    block_n = block_n or (16 if wide else BLOCK_N)
    num_stages = num_stages or (1 if wide else NUM_STAGES)
    kv_len, rope = latent.shape[1], q_rope.shape[2]
    out = torch.empty(b, h, rank, device=q_latent.device, dtype=q_latent.dtype)
    lse = torch.empty(b, h, device=q_latent.device, dtype=torch.float32)
    if b == 0 or h == 0:
        return out, lse
    head_tiles = triton.cdiv(h, block_h)
    splits, per_split = split_plan(
        kv_len, num_splits or default_splits(b, head_tiles, kv_len), block_n
    )
    parts = torch.empty(splits, b, h, rank, device=q_latent.device, dtype=torch.float32)
    part_lse = torch.empty(splits, b, h, device=q_latent.device, dtype=torch.float32)
    lengths32 = lengths.to(device=q_latent.device, dtype=torch.int32).contiguous()
    _latent_decode_split[(b, head_tiles, splits)](
        q_latent,
        q_rope,
        latent,
        k_rope,
        lengths32,
        parts,
        part_lse,
        q_latent.stride(0),
        q_latent.stride(1),
        q_rope.stride(0),
        q_rope.stride(1),
        latent.stride(0),
        latent.stride(1),
        k_rope.stride(0),
        k_rope.stride(1),
        parts.stride(0),
        parts.stride(1),
        parts.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        h,
        scale * LOG2E,
        per_split,
        RANK=rank,
        ROPE=rope,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_R=max(16, triton.next_power_of_2(rank)),
        BLOCK_P=max(16, triton.next_power_of_2(rope)),
        EXACT=q_latent.dtype == torch.float32,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    merge_splits(parts, part_lse, out, lse)
    return out, lse
