"""A pre-norm block's decode-step work around attention, in two C++ calls (float32, CPU).

`attention_inputs`: RMSNorm, the q/k/v projections and RoPE. `block_outputs`: the output
projection and residual, RMSNorm, the SwiGLU MLP and residual. Between them the caller
runs attention (and its cache) as usual. At decode a block's ~50 small torch ops cost more
than its arithmetic outside the matmuls; csrc/decode_block.cpp does that work in place,
with the packed-weight matmuls of `skinny_linear`.

`DecodeStack` runs a whole stack of such blocks for one decode step in one call, attention
included: the new K/V are written into the cache's storage and read back by the decode
kernel (csrc/decode_attention.h) in place, so a step costs one call instead of ~15 Python
calls a layer. `LatentDecodeStack` does the same for MLA blocks over a latent cache.

`fusable(x, tensors)` says whether the calls serve a step: float32 CPU tensors, at most
`MAX_ROWS` rows (batch x new tokens), no autograd, the kernel built and packed weights on
(`ATTNKIT_PACKED_WEIGHTS=0` and `ATTNKIT_NO_CPP=1` turn the path off). Results equal the
unfused torch ops up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from attnkit.ops.cpp_build import load_kernel, unavailable_reason
from attnkit.ops.skinny_linear import MAX_ROWS, packed_weight, packed_weights_enabled
from attnkit.ops.transforms import needs_torch_ops

SOURCE = "decode_block.cpp"


class BlockWeights(NamedTuple):
    """A pre-norm block's tensors for the fused calls (weights as stored, packed on use)."""

    attn_norm: tuple[Tensor, float]  # weight, eps
    qkv: tuple[Tensor, Tensor, Tensor]
    qkv_bias: tuple[Tensor | None, Tensor | None, Tensor | None]
    wo: tuple[Tensor, Tensor | None]  # weight, bias
    mlp_norm: tuple[Tensor, float]
    mlp: tuple[Tensor, Tensor, Tensor]  # gate, up, down


class KVStorage(NamedTuple):
    """Where a decode step's K/V live, as `DecodeStack` writes and reads them.

    k, v: `(layers, blocks, block_size, kv_heads, head_dim)` (any strides, head_dim
    contiguous); block_table `(batch, max_blocks)`: each sequence's blocks in order;
    starts `(batch,)`: how many keys each sequence's new token sees before itself; it is
    written at that index and sees all of them. `window` and `sinks`, where set, say the
    storage holds only the keys of `sliding_window(window) | sinks(sinks)`: a ring buffer
    lists exactly those (blocks of one token, in any order, the new token's slot last); a
    paged cache with a window has given back the blocks between them. `window` None:
    every key before the new token. Int8 k and v come with `scales` (k's,
    v's: `(layers, blocks, block_size, kv_heads)` float32, one per row) and `error`, the
    cache's float64 `[max abs, max relative, sum relative]` quantization error, which the
    kernel updates with the rows it quantizes.
    """

    k: Tensor
    v: Tensor
    block_table: Tensor
    starts: Tensor
    window: int | None = None
    sinks: int = 0
    scales: tuple[Tensor, Tensor] | None = None
    error: Tensor | None = None


class DecodeStack:
    """Blocks of one GQA shape (`heads` = (query, KV) heads of `head_dim`, an MLP of
    `intermediate` features), run for a decode step in one C++ call; their weights are
    packed once, here (the packed copies are shared with the per-block calls)."""

    def __init__(
        self,
        blocks: Sequence[BlockWeights],
        heads: tuple[int, int],
        head_dim: int,
        intermediate: int,
        interleaved: bool,
    ) -> None:
        module = load_kernel(SOURCE)
        if module is None:
            raise RuntimeError(f"DecodeStack needs its C++ kernel: {unavailable_reason(SOURCE)}")
        layers, biases, eps = [], [], []
        for w in blocks:
            weights = (*w.qkv, w.wo[0]), w.mlp
            q, k, v, wo = (packed_weight(t, module) for t in weights[0])
            gate, up, down = (packed_weight(t, module) for t in weights[1])
            norms = w.attn_norm[0].contiguous(), w.mlp_norm[0].contiguous()
            layers.append([norms[0], q, k, v, wo, norms[1], gate, up, down])
            bias = (*w.qkv_bias, w.wo[1])
            biases.append([None if b is None else b.contiguous() for b in bias])
            eps.append((float(w.attn_norm[1]), float(w.mlp_norm[1])))
        self._stack = module.DecodeStack(
            layers, biases, eps, heads[0], heads[1], head_dim, intermediate, interleaved
        )
        self._kv_shape = (heads[1], head_dim)

    def serves(self, storage: KVStorage) -> bool:
        """Whether `storage` holds float32 (or int8, with its scales and error) CPU K/V of
        this stack's layers and shape (a cache for another model would be refused by the
        kernel; callers can take another path)."""
        dtype = torch.float32 if storage.scales is None else torch.int8
        return all(
            t.dtype == dtype and t.dim() == 5 and t.shape[0] == len(self)
            and tuple(t.shape[3:]) == self._kv_shape and t.device.type == "cpu"
            for t in (storage.k, storage.v)
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self._stack)

    def __call__(
        self,
        x: Tensor,
        storage: KVStorage,
        cos: Tensor,
        sin: Tensor,
        window: tuple[int, int] | None = None,
    ) -> Tensor:
        """The stack's output for `x` (batch, 1, hidden), one new token per sequence, whose
        K/V it stores in `storage`; `cos`, `sin` `(batch, r/2)` are the tokens' angles.
        `window` (W, S): each token sees only the last W keys of its table and the first S
        (the layers' `sliding_window(W) | sinks(S)`); None: all of them."""
        b, _, hidden = x.shape
        rows, tables = x.reshape(b, hidden).contiguous(), (storage.block_table, storage.starts)
        scales = (None, None) if storage.scales is None else storage.scales
        seen = window or (0, 0)  # the kernel's "every key"
        out = self._stack.run(
            rows, storage.k, storage.v, *tables, cos.contiguous(), sin.contiguous(),
            *scales, storage.error, *seen,
        )  # fmt: skip
        return out.view(b, 1, hidden)


class LatentBlockWeights(NamedTuple):
    """A pre-norm MLA block's tensors (`LatentAttention` without a query latent) for
    `LatentDecodeStack`, as stored: projections (weight, bias), norms (weight, eps)."""

    attn_norm: tuple[Tensor, float]
    wq: tuple[Tensor, Tensor | None]
    wkv_a: tuple[Tensor, Tensor | None]
    kv_norm: tuple[Tensor, float] | None  # the latent's RMSNorm, if any
    wkv_b: Tensor  # (heads · (nope_dim + v_head_dim), kv_rank): W_uk and W_uv per head
    wo: tuple[Tensor, Tensor | None]
    mlp_norm: tuple[Tensor, float]
    mlp: tuple[Tensor, Tensor, Tensor]  # gate, up, down


class LatentShape(NamedTuple):
    """What every block of a `LatentDecodeStack` shares (`LatentAttention`'s settings; the
    no-RoPE query/key dims and the score scale may differ by layer, as `to_mla` makes them)."""

    heads: int
    kv_rank: int
    rope_heads: int
    rope_dim: int
    v_head_dim: int
    intermediate: int


class LatentDecodeStack:
    """MLA blocks run for a decode step in one C++ call, in absorbed mode: the latent and
    RoPE key of each new token written into a `LatentCache`'s storage, attention read over
    the cached latents in place (csrc/latent_attention.h). Weights are packed once, here."""

    def __init__(
        self,
        blocks: Sequence[LatentBlockWeights],
        shape: LatentShape,
        layers: Sequence[tuple[int, float, tuple[int, ...]]],
        interleaved: bool,
    ) -> None:
        """`layers`: per block, its `nope_dim`, score `scale` and `rope_pairs` (the angle
        column of each RoPE pair; a conversion picks its own per layer)."""
        module = load_kernel(SOURCE)
        if module is None:
            reason = unavailable_reason(SOURCE)
            raise RuntimeError(f"LatentDecodeStack needs its C++ kernel: {reason}")
        heads, rank = shape.heads, shape.kv_rank
        tensors, biases, eps = [], [], []
        for w, (nope, _, _) in zip(blocks, layers, strict=True):
            wq, wkv_a, wo = (packed_weight(t[0], module) for t in (w.wq, w.wkv_a, w.wo))
            gate, up, down = (packed_weight(t, module) for t in w.mlp)
            per_head = w.wkv_b.view(heads, nope + shape.v_head_dim, rank)
            w_uk, w_uv = (t.contiguous() for t in per_head.split([nope, shape.v_head_dim], 1))
            kv_norm = torch.empty(0) if w.kv_norm is None else w.kv_norm[0].contiguous()
            norms = w.attn_norm[0].contiguous(), w.mlp_norm[0].contiguous()
            tensors.append([norms[0], wq, wkv_a, kv_norm, w_uk, w_uv, wo, norms[1], gate, up, down])
            bias = (w.wq[1], w.wkv_a[1], w.wo[1])
            biases.append([None if b is None else b.contiguous() for b in bias])
            kv_eps = 0.0 if w.kv_norm is None else w.kv_norm[1]
            eps.append([float(w.attn_norm[1]), float(w.mlp_norm[1]), float(kv_eps)])
        dims = [heads, rank, shape.rope_heads, shape.rope_dim, shape.v_head_dim, shape.intermediate]
        scales = [float(scale) for _, scale, _ in layers]
        self._stack = module.LatentDecodeStack(tensors, biases, eps, scales, dims, interleaved)
        self._widths = (rank, shape.rope_heads * shape.rope_dim)
        self._pairs = torch.tensor([list(p) for *_, p in layers])  # (layers, rope_dim / 2)

    def serves(self, storage: KVStorage) -> bool:
        """Whether `storage` holds a float32 CPU latent cache of this stack's layers and
        widths (latents as K, flattened RoPE keys as V, one "KV head")."""
        if storage.scales is not None or storage.window is not None:
            return False
        return all(
            t.dtype == torch.float32 and t.dim() == 5 and t.shape[0] == len(self)
            and tuple(t.shape[3:]) == (1, width) and t.device.type == "cpu"
            for t, width in zip((storage.k, storage.v), self._widths, strict=True)
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self._stack)

    def __call__(
        self,
        x: Tensor,
        storage: KVStorage,
        cos: Tensor,
        sin: Tensor,
        window: tuple[int, int] | None = None,
    ) -> Tensor:
        """The stack's output for `x` (batch, 1, hidden); `cos`, `sin` `(batch, r/2)` are the
        model's angles for the tokens, of which each layer's RoPE pairs take their columns.
        `window` as `DecodeStack`'s, but MLA layers see every key: it must be None."""
        if window is not None:
            raise ValueError(f"LatentDecodeStack attends every key, got window={window}")
        b, _, hidden = x.shape
        # (batch, columns) -> (layers, batch, rope_dim / 2): each layer's pairs' columns
        cos, sin = (t[:, self._pairs].transpose(0, 1).contiguous() for t in (cos, sin))
        out = self._stack.run(
            x.reshape(b, hidden).contiguous(), storage.k, storage.v, storage.block_table,
            storage.starts, cos, sin,
        )  # fmt: skip
        return out.view(b, 1, hidden)


def fusable(x: Tensor, tensors: list[Tensor | None]) -> bool:
    """Whether `x` (batch, seq, hidden) and the block's weights can take the fused calls."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 3:
        return False
    if not 1 <= x.shape[0] * x.shape[1] <= MAX_ROWS:
        return False
    present = [t for t in tensors if t is not None]
    if any(t.dtype != torch.float32 for t in present):
        return False
    if needs_torch_ops(x, *present):
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
