"""A Transformer's decode step through all of its blocks in one C++ call.

`ops.decode_block.DecodeStack` runs every block of a step at once, attention included,
writing the new K/V into the cache's storage itself. It serves a step when each block
takes the per-block fused calls (`Block._decode_weights`: plain attnkit layers, float32 on
CPU, no hooks), every attention layer is plain full attention (no window, sinks, pattern,
cross-attention, or backend other than `auto`) of one shape, the cache lends its storage
(`KVCache.decode_storage`: contiguous or paged float32 K/V at a step of one token per
sequence), and no gradient is being recorded. Anything else returns None and the blocks
run one by one, as before, with the same results up to float32 rounding.

The stack holds packed copies of the weights, so it is built once and rebuilt whenever
something it depends on changes: a module or parameter replaced, a parameter written in
place (its version; inference tensors keep none, as `skinny_linear.packed_weight` says),
moved (its data pointer), a hook or an instance `forward` added, an attention setting or
norm epsilon changed. That fingerprint is re-read every step (~0.3 ms of a ~35 ms SmolLM2
step), which is what makes the stack safe to keep.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.layers.attention import Attention
from attnkit.ops.decode_block import DecodeStack
from attnkit.ops.skinny_linear import MAX_ROWS


class StackedDecode:
    """Runs a model's decode steps through a `DecodeStack` when they qualify (see module)."""

    def __init__(self) -> None:
        self._fingerprint: tuple | None = None
        self._stack: DecodeStack | None = None
        self._kept: list[Tensor] = []  # the parameters whose ids the fingerprint holds

    def __deepcopy__(self, memo) -> StackedDecode:
        return StackedDecode()  # a memo of packed weights: a copied model builds its own

    def __getstate__(self) -> dict:
        return {}  # pickled (torch.save of a model) as empty: rebuilt on the first step

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def __call__(self, blocks: nn.ModuleList, x: Tensor, ctx, global_hooks: bool) -> Tensor | None:
        """The blocks' output for `x` (batch, 1, hidden), or None when the step does not
        qualify (then the caller runs the blocks one by one)."""
        cache = ctx.cache
        if cache is None or global_hooks or torch.is_grad_enabled():
            return None
        if x.dim() != 3 or x.shape[1] != 1 or not 1 <= x.shape[0] <= MAX_ROWS:
            return None
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        storage = cache.decode_storage()
        if storage is None:
            return None
        fingerprint = _fingerprint(blocks)
        if fingerprint is None:
            return None
        if fingerprint != self._fingerprint:
            self._stack = _build(blocks, x, ctx)
            self._fingerprint, self._kept = fingerprint, list(blocks.parameters())
        if self._stack is None or not self._stack.serves(storage):
            return None
        out = self._stack(x, storage, *ctx.angles_by_row(x.shape[0], 1))
        cache.stored_every_layer()
        return out


def _build(blocks: nn.ModuleList, x: Tensor, ctx) -> DecodeStack | None:
    """A stack of `blocks`' weights, or None when some block or layer does not qualify."""
    weights, shapes = [], set()
    for i, block in enumerate(blocks):
        w = block._decode_weights(x, ctx)
        attn = block.attn
        plain = attn.window is None and attn.sinks == 0 and attn.pattern is None
        if w is None or not plain or attn.backend != "auto" or attn.layer_idx != i:
            return None
        weights.append(w)
        shapes.add((attn.n_heads, attn.n_kv_heads, attn.head_dim, w.mlp[0].shape[0]))
    if len(shapes) != 1:
        return None
    heads, kv_heads, head_dim, intermediate = shapes.pop()
    return DecodeStack(weights, (heads, kv_heads), head_dim, intermediate, ctx.interleaved)


def _fingerprint(blocks: nn.ModuleList) -> tuple | None:
    """Everything a built stack depends on, cheap to compare; None when a module has hooks
    or an instance `forward` (the blocks must then run as modules)."""
    parts: list = [tuple(blocks)]
    for block in blocks:
        m = block._modules
        attn = m.get("attn")
        if type(attn) is not Attention:
            return None
        modules = (block, *m.values(), *attn._modules.values(), *m["mlp"]._modules.values())
        parts.append(modules)  # compared by identity (modules define no __eq__)
        for module in modules:
            if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
                return None
            for p in module._parameters.values():
                if p is not None:
                    version = -1 if p.is_inference() else p._version
                    parts.append((id(p), p.data_ptr(), version))
        attention = (attn.window, attn.sinks, attn.pattern is None, attn.backend, attn.cross)
        norms = (getattr(m["attn_norm"], "eps", None), getattr(m["mlp_norm"], "eps", None))
        parts.append((*attention, attn.layer_idx, *norms))
    return tuple(parts)
