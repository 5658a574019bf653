"""A pre-norm block's decode-step work around attention, in two C++ calls (float32, CPU).

`attention_inputs`: RMSNorm, the q/k/v projections and RoPE. `block_outputs`: the output
projection and residual, RMSNorm, the SwiGLU MLP and residual. Between them the caller
runs attention (and its cache) as usual. At decode a block's ~50 small torch ops cost more
than its arithmetic outside the matmuls; csrc/decode_block.cpp does that work in place,
with the packed-weight matmuls of `skinny_linear`.

`fusable(x, tensors)` says whether the calls serve a step: float32 CPU tensors, at most
`MAX_ROWS` rows (batch x new tokens), no autograd, the kernel built and packed weights on
(`ATTNKIT_PACKED_WEIGHTS=0` and `ATTNKIT_NO_CPP=1` turn the path off). Results equal the
unfused torch ops up to float32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops.cpp_build import load_kernel, wants_grad
from attnkit.ops.skinny_linear import MAX_ROWS, packed_weight, packed_weights_enabled

SOURCE = "decode_block.cpp"


def fusable(x: Tensor, tensors: list[Tensor | None]) -> bool:
    """Whether `x` (batch, seq, hidden) and the block's weights can take the fused calls."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 3:
        return False
    if not 1 <= x.shape[0] * x.shape[1] <= MAX_ROWS:
        return False
    present = [t for t in tensors if t is not None]
    if any(t.dtype != torch.float32 for t in present):
        return False
    if torch.is_grad_enabled() and wants_grad(x, *present):
        return False
    return packed_weights_enabled() and load_kernel(SOURCE) is not None


def attention_inputs(
    x: Tensor,
    norm_weight: Tensor,
    eps: float,
    weights: tuple[Tensor, Tensor, Tensor],
    biases: tuple[Tensor | None, Tensor | None, Tensor | None],
    cos: Tensor,
    sin: Tensor,
    heads: tuple[int, int],
    head_dim: int,
    interleaved: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v `(batch, heads, seq, head_dim)` of `x` (batch, seq, hidden): rms_norm, the
    projections `weights` (q, k, v) and RoPE on q and k; `cos`, `sin` are
    `(batch · seq, r/2)`, one row of angles per token (`AttentionContext.angles_by_row`);
    `heads` = (query, KV) heads."""
    b, t, hidden = x.shape
    module = load_kernel(SOURCE)
    q, k, v = module.attention_inputs(
        x.reshape(b * t, hidden).contiguous(),
        norm_weight.contiguous(),
        eps,
        [packed_weight(w, module) for w in weights],
        [w.shape[0] for w in weights],
        [None if bias is None else bias.contiguous() for bias in biases],
        cos,
        sin,
        head_dim,
        interleaved,
    )
    n_heads, n_kv_heads = heads
    # (B·T, H·d) -> (B, H, T, d)
    return (
        q.view(b, t, n_heads, head_dim).transpose(1, 2),
        k.view(b, t, n_kv_heads, head_dim).transpose(1, 2),
        v.view(b, t, n_kv_heads, -1).transpose(1, 2),
    )


def block_outputs(
    x: Tensor,
    attn: Tensor,
    wo: Tensor,
    bias_o: Tensor | None,
    norm_weight: Tensor,
    eps: float,
    mlp: tuple[Tensor, Tensor, Tensor],
) -> Tensor:
    """`y + down(silu(gate(n)) * up(n))` with `y = x + attn @ wo.T (+ bias_o)` and
    `n = rms_norm(y)`; x (batch, seq, hidden), attn (batch, seq, heads · v_dim), `mlp` =
    the (gate, up, down) weights."""
    module = load_kernel(SOURCE)
    gate, up, down = mlp
    rows = x.shape[0] * x.shape[1]
    out = module.block_outputs(
        x.reshape(rows, x.shape[-1]).contiguous(),
        attn.reshape(rows, attn.shape[-1]).contiguous(),
        packed_weight(wo, module),
        None if bias_o is None else bias_o.contiguous(),
        norm_weight.contiguous(),
        eps,
        packed_weight(gate, module),
        packed_weight(up, module),
        packed_weight(down, module),
        gate.shape[0],
    )
    return out.view(x.shape)
