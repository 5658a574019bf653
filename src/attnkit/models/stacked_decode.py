"""A Transformer's decode step through all of its blocks in one C++ call.

`ops.decode_block.DecodeStack` runs every block of a step at once, attention included,
writing the new K/V into the cache's storage itself. It serves a step when each block
is exactly the model's own block class (a subclass may override `forward`) and takes the
per-block fused calls (`Block._decode_weights`: plain attnkit layers, float32 on CPU, no
hooks), every attention layer is self-attention of one shape with the `auto` backend and
no sparse pattern, the cache lends its storage (`KVCache.decode_storage`: contiguous,
paged, ring-buffer or int8 K/V at a step of one token per sequence) listing the keys the
layers see (all of them for full-attention layers; for windowed layers, at least their
window and sinks: the kernel reads only those), and no gradient is being recorded. MLA
blocks (`LatentAttention` without a query latent, in `auto` or `absorbed` mode with the
`auto` backend) take `ops.decode_block.LatentDecodeStack` the same way, over a
`LatentCache`'s storage, in absorbed mode. Anything else returns None and the blocks run
one by one, as before, with the same results up to float32 rounding.

A model mixing windowed and global layers (as Gemma 2 and gpt-oss do) keeps a
`LayeredCache` of a cache per kind of layer; each group lends its own storage, and the step
runs one call per run of consecutive layers that share a storage and a window (alternating
layers: one call a layer, still in C++ from end to end). Each run's stack is built on first
use and kept.

The stack holds packed copies of the weights, so it is built once and rebuilt whenever
something it depends on changes: a module or parameter replaced, a parameter written in
place (its version; inference tensors keep none, as `skinny_linear.packed_weight` says),
moved (its data pointer; the stack keeps the old data alive, so a replaced tensor's
address cannot be reused by its successor), a hook or an instance `forward` added, an
attention setting, head shape, RoPE layout or norm epsilon changed (a write into
`p.data[...]` bumps only that view's version and goes unseen, as in `packed_weight`: write
the parameter itself under `torch.no_grad()`). That fingerprint is re-read every step
(~0.3 ms of a ~35 ms SmolLM2 step), which is what makes the stack safe to keep.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.cache.latent import LatentCache
from attnkit.cache.layered import LayeredCache
from attnkit.layers.attention import Attention
from attnkit.layers.latent import LatentAttention
from attnkit.ops.decode_block import (
    BlockWeights,
    DecodeStack,
    KVStorage,
    LatentDecodeStack,
    LatentShape,
)
from attnkit.ops.masks import window_within
from attnkit.ops.skinny_linear import MAX_ROWS
from attnkit.ops.transforms import transform_active

Stack = DecodeStack | LatentDecodeStack


class StackedDecode:
    """Runs a model's decode steps through a `DecodeStack` (or, for MLA blocks, a
    `LatentDecodeStack`) when they qualify (see module). A `LayeredCache` (windowed and
    global layers in pools of their own) lends one storage per group: the layers then run
    in one call per run of consecutive layers of one group."""

    def __init__(self, block_type: type[nn.Module]) -> None:
        self.block_type = block_type  # the only block class whose forward the stack knows
        self._fingerprint: tuple | None = None
        self._plan: _Plan | None = None
        # The parameters (ids in the fingerprint) and their data at build time: holding the
        # data keeps its address from being reused by a tensor that replaced it (`p.data =`).
        self._kept: list[Tensor] = []

    def __deepcopy__(self, memo) -> StackedDecode:
        return StackedDecode(self.block_type)  # a copied model packs its own weights

    def __getstate__(self) -> dict:
        # Pickled (torch.save of a model) without the packed weights: rebuilt on first use.
        return {"block_type": self.block_type}

    def __setstate__(self, state: dict) -> None:
        if "block_type" not in state:  # pickled before the stack knew its block class
            from attnkit.models.llama import Block

            state = {"block_type": Block}
        self.__init__(state["block_type"])

    def __call__(self, blocks: nn.ModuleList, x: Tensor, ctx, global_hooks: bool) -> Tensor | None:
        """The blocks' output for `x` (batch, 1, hidden), or None when the step does not
        qualify (then the caller runs the blocks one by one)."""
        cache = ctx.cache
        if cache is None or global_hooks or torch.is_grad_enabled() or transform_active():
            return None
        if x.dim() != 3 or x.shape[1] != 1 or not 1 <= x.shape[0] <= MAX_ROWS:
            return None
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return None
        groups = _storage_groups(cache, len(blocks))
        if groups is None:
            return None
        fingerprint = _fingerprint(blocks, self.block_type, ctx.interleaved)
        if fingerprint is None:
            return None
        if fingerprint != self._fingerprint:
            self._plan = _Plan.build(blocks, x, ctx)
            self._fingerprint = fingerprint
            self._kept = [t for p in blocks.parameters() for t in (p, p.data)]
        latent = any(isinstance(c, LatentCache) for c in getattr(cache, "caches", [cache]))
        runs = self._plan.runs(groups, latent) if self._plan else None
        if runs is None:
            return None
        angles = ctx.angles_by_row(x.shape[0], 1)
        for stack, storage, window in runs:
            x = stack(x, storage, *angles, window=window)
        cache.stored_every_layer()
        return x


class _Plan:
    """What a model's blocks can run as: one stack of every block, or (GQA blocks) the
    blocks' weights and windows, from which a stack of any run of consecutive layers is
    built once, when a cache first asks for that run."""

    def __init__(
        self, whole: Stack | None, layers: list[tuple[BlockWeights, tuple | None]], shape: tuple
    ) -> None:
        # whole: an MLA stack; layers: each GQA block's weights and (window, sinks) or None;
        # shape: (heads, kv_heads, head_dim, intermediate, interleaved) of every GQA block
        self.whole, self.layers, self.shape = whole, layers, shape
        self._stacks: dict[tuple[int, int], DecodeStack] = {}

    @classmethod
    def build(cls, blocks: nn.ModuleList, x: Tensor, ctx) -> _Plan | None:
        """None when some block or layer does not qualify."""
        if len(blocks) and isinstance(blocks[0]._modules["attn"], LatentAttention):
            stack = _build_latent(blocks, x, ctx)
            return None if stack is None else cls(stack, [], ())
        layers, shapes = [], set()
        for i, block in enumerate(blocks):
            w = block._decode_weights(x, ctx)
            attn = block.attn
            sparse = attn.pattern is not None and attn.window is None  # a pattern of its own
            if w is None or sparse or attn.backend != "auto" or attn.layer_idx != i:
                return None
            layers.append((w, None if attn.window is None else (attn.window, attn.sinks)))
            shapes.add((attn.n_heads, attn.n_kv_heads, attn.head_dim, w.mlp[0].shape[0]))
        if len(shapes) != 1:
            return None
        return cls(None, layers, (*shapes.pop(), ctx.interleaved))

    def runs(self, groups: list[tuple[int, int, KVStorage]], latent_cache: bool):
        """`(stack, storage, window)` per run of consecutive layers that share a storage
        (`groups`: first layer, stop, storage) and a window, or None when one cannot be
        served (the step then runs block by block). `latent_cache`: the cache, or one of
        its groups, is a `LatentCache` (whose storage a GQA stack must never write, even
        where its widths happen to match)."""
        if self.whole is not None:  # MLA: one stack, over a LatentCache's one storage
            (_, _, storage), *more = groups
            if more or not latent_cache or not self.whole.serves(storage):
                return None
            return [(self.whole, storage, None)]
        if latent_cache:
            return None  # a cache of the other kind with matching widths: the layers say why
        runs = []
        for first, stop, storage in groups:
            for lo, hi in _same_window(self.layers, first, stop):
                stack = self._stack(lo, hi)
                part = _layers_of(storage, lo - first, hi - first)
                window = self.layers[lo][1]
                if not (stack.serves(part) and _holds_the_window_of(part, window)):
                    return None
                runs.append((stack, part, window or _window_of(part)))
        return runs

    def _stack(self, lo: int, hi: int) -> DecodeStack:
        if (lo, hi) not in self._stacks:
            heads, kv_heads, head_dim, intermediate, interleaved = self.shape
            weights = [w for w, _ in self.layers[lo:hi]]
            self._stacks[lo, hi] = DecodeStack(
                weights, (heads, kv_heads), head_dim, intermediate, interleaved
            )
        return self._stacks[lo, hi]


def _storage_groups(cache, n_layers: int) -> list[tuple[int, int, KVStorage]] | None:
    """The cache's decode storage as (first layer, stop, storage of those layers) covering
    the model's layers: one for a plain cache, one per run of consecutive layers of one
    group for a `LayeredCache` (consecutive in its group's storage too); None when some
    cache lends none or holds another number of layers."""
    if not isinstance(cache, LayeredCache):
        storage = cache.decode_storage()
        if storage is None or storage.k.shape[0] != n_layers:
            return None
        return [(0, n_layers, storage)]
    if cache.n_layers != n_layers:
        return None
    storages = {}
    for group in cache.caches:
        storage = storages[id(group)] = group.decode_storage()
        if storage is None or storage.k.shape[0] != group.n_layers:
            return None
    runs: list[list] = []  # [first, stop, storage, its first layer in the storage]
    for layer in range(n_layers):
        group, local = cache.route(layer)
        storage = storages[id(group)]
        last = runs[-1] if runs else None
        if last and last[2] is storage and local == last[3] + layer - last[0]:
            last[1] = layer + 1
        else:
            runs.append([layer, layer + 1, storage, local])
    return [(first, stop, _layers_of(storage, local, local + stop - first))
            for first, stop, storage, local in runs]  # fmt: skip


def _layers_of(storage: KVStorage, lo: int, hi: int) -> KVStorage:
    """`storage` of its layers `lo .. hi - 1` only (views)."""
    scales = None if storage.scales is None else tuple(t[lo:hi] for t in storage.scales)
    return storage._replace(k=storage.k[lo:hi], v=storage.v[lo:hi], scales=scales)


def _same_window(layers: list[tuple], first: int, stop: int) -> list[tuple[int, int]]:
    """Layers `first .. stop - 1` split into runs of consecutive layers of one window."""
    runs: list[list[int]] = []
    for layer in range(first, stop):
        if runs and layers[layer][1] == layers[runs[-1][0]][1]:
            runs[-1][1] = layer + 1
        else:
            runs.append([layer, layer + 1])
    return [(lo, hi) for lo, hi in runs]


def _holds_the_window_of(storage, layers: tuple[int, int] | None) -> bool:
    """Whether `storage` holds every key that layers of `layers`' (window, sinks) see (None:
    full attention, which sees what the storage lists, as through the caches' `attend`).

    A storage with a window lists only that window's keys: a ring buffer exactly them, in a
    compact table (so applying its own window there changes nothing); a paged cache with a
    window every position, those it gave back unreadable. Windowed layers need all of theirs.
    """
    if layers is None or storage.window is None:
        return True
    return window_within(layers, storage.window, storage.sinks)


def _window_of(storage) -> tuple[int, int] | None:
    return None if storage.window is None else (storage.window, storage.sinks)


def _build_latent(blocks: nn.ModuleList, x: Tensor, ctx) -> LatentDecodeStack | None:
    """A stack of MLA blocks of one shape, or None when some block does not qualify."""
    weights, shapes, layers = [], set(), []
    for i, block in enumerate(blocks):
        attn = block._modules["attn"]
        w = block._latent_decode_weights(x, ctx) if type(attn) is LatentAttention else None
        if w is None or attn.layer_idx != i:
            return None
        weights.append(w)
        dims = (attn.n_heads, attn.kv_rank, attn.rope_heads, attn.rope_dim, attn.v_head_dim)
        shapes.add(LatentShape(*dims, w.mlp[0].shape[0]))
        layers.append((attn.nope_dim, attn.scale, attn.rope_pairs))
    if len(shapes) != 1:
        return None
    return LatentDecodeStack(weights, shapes.pop(), layers, ctx.interleaved)


def _fingerprint(blocks: nn.ModuleList, block_type: type, interleaved: bool) -> tuple | None:
    """Everything a built stack depends on, cheap to compare; None when a block is not
    exactly `block_type` or a module has hooks or an instance `forward` (the blocks must
    then run as modules)."""
    parts: list = [tuple(blocks), interleaved]
    for block in blocks:
        if type(block) is not block_type:
            return None
        m = block._modules
        attn = m["attn"]
        if type(attn) not in (Attention, LatentAttention):
            return None
        # (an unset optional submodule, e.g. `attn.kv_norm = None`, stays in _modules as None)
        children = (*m.values(), *attn._modules.values(), *m["mlp"]._modules.values())
        modules = (block, *(c for c in children if c is not None))
        parts.append(modules)  # compared by identity (modules define no __eq__)
        for module in modules:
            if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
                return None
            for p in module._parameters.values():
                if p is not None:
                    version = -1 if p.is_inference() else p._version
                    parts.append((id(p), p.data_ptr(), version))
        norms = (getattr(m["attn_norm"], "eps", None), getattr(m["mlp_norm"], "eps", None))
        parts.append((*_attention_settings(attn), attn.layer_idx, *norms))
    return tuple(parts)


def _attention_settings(attn: nn.Module) -> tuple:
    """An attention layer's settings that a built stack depends on (besides its weights)."""
    if type(attn) is LatentAttention:
        dims = (attn.n_heads, attn.kv_rank, attn.rope_heads, attn.rope_dim, attn.nope_dim)
        # (a norm's eps None and no norm look alike here; the module's identity differs)
        kv_norm = None if attn.kv_norm is None else attn.kv_norm.eps
        return (attn.mode, attn.backend, attn.scale, attn.rope_pairs, attn.q_rank, *dims,
                attn.v_head_dim, kv_norm)  # fmt: skip
    attention = (attn.window, attn.sinks, attn.pattern is None, attn.backend, attn.cross)
    return (*attention, attn.n_heads, attn.n_kv_heads, attn.head_dim)
