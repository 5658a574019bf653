"""Multi-head attention with grouped K/V heads (MHA / GQA / MQA), rotary positions and a cache."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import Tensor, nn

from attnkit._checks import check_positive_int
from attnkit.cache.base import KVCache, cache_call, narrow_mask
from attnkit.cache.contiguous import ContiguousCache
from attnkit.cache.encoder import EncoderCache, check_source_lengths
from attnkit.cache.window import SlidingWindowCache
from attnkit.layers.projection import Linear, project
from attnkit.layers.rope import apply_rotary, rotation_phasors
from attnkit.ops.attention import attention
from attnkit.ops.masks import Mask, padding, window_and_sinks_mask


@dataclass(frozen=True)
class AttentionContext:
    """What every attention layer of one forward pass shares (computed once per pass)."""

    cos: Tensor  # (seq,) or (batch, seq) positions' angles, (..., rotary_dim // 2)
    sin: Tensor
    mask: Mask | None
    cache: KVCache | None
    interleaved: bool  # RoPE layout: adjacent pairs (GGUF) or half-split (Hugging Face)
    # Cross-attention layers only: the encoder output (batch, src_len, memory_hidden), its
    # real tokens per row (batch,) (right padding; None: all), and the cache of its K/V.
    memory: Tensor | None = None
    memory_lengths: Tensor | None = None
    cross_cache: EncoderCache | None = None

    @cached_property  # once per forward pass, for every layer
    def phasors(self) -> Tensor | None:
        """The interleaved rotation as complex numbers (`rotation_phasors`); None otherwise."""
        return rotation_phasors(self.cos, self.sin) if self.interleaved else None

    @cached_property
    def _angle_rows(self) -> dict[tuple[int, int], tuple[Tensor, Tensor]]:
        return {}

    def angles_by_row(self, batch: int, seq: int) -> tuple[Tensor, Tensor]:
        """cos and sin as contiguous `(batch · seq, r/2)`, one row per token, made once per
        pass (the fused decode calls of `ops.decode_block` take them so)."""
        key = (batch, seq)
        if key not in self._angle_rows:
            half = self.cos.shape[-1]
            self._angle_rows[key] = tuple(
                a.expand(batch, seq, half).reshape(batch * seq, half).contiguous()
                for a in (self.cos, self.sin)
            )
        return self._angle_rows[key]


class Attention(nn.Module):
    """Self-attention: `wq`, `wk`, `wv`, `wo` projections; K/V heads shared by query groups.

    x: (batch, seq, hidden) -> (batch, seq, hidden). With a cache in the context, the new
    K/V are stored and attention runs over everything the cache holds for the sequences.

    A layer may see less than everything before it: `window=W` (the W most recent keys,
    itself included; Mistral, Gemma-2's local layers) plus optional `sinks` (the first
    tokens, StreamingLLM), or any causal `pattern` mask (e.g. `strided(s)`,
    `causal() & block_sparse(...)`), evaluated at absolute positions. Windowed layers get
    a ring-buffer cache from `new_cache`, so their memory stays at W tokens.

    `cross=True` makes it cross-attention (encoder-decoder): queries come from `x`, keys and
    values from the encoder output `ctx.memory` (width `memory_hidden`, default `hidden`),
    without RoPE and without causal masking, only the source's key padding. With
    `ctx.cross_cache` the memory is projected once and later steps read the cached K/V.
    """

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        window: int | None = None,
        sinks: int = 0,
        pattern: Mask | None = None,
        cross: bool = False,
        memory_hidden: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.window, self.sinks, self.pattern = window, sinks, layer_pattern(window, sinks, pattern)
        self.layer_idx, self.n_heads, self.n_kv_heads, self.head_dim = (
            layer_idx,
            n_heads,
            n_kv_heads,
            head_dim,
        )
        self.backend = backend
        self.cross, self.memory_hidden = cross_options(cross, memory_hidden, hidden, self.pattern)
        self.wq = Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.wk = Linear(self.memory_hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = Linear(self.memory_hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = Linear(n_heads * head_dim, hidden, bias=out_bias)

    @property
    def cache_kind(self) -> tuple:
        """Layers with equal `cache_kind` can share one cache (`Transformer.new_cache`)."""
        if self.cross:
            return ("encoder", self.n_kv_heads, self.head_dim)
        return ("kv", self.n_kv_heads, self.head_dim, self.window, self.sinks)

    def new_cache(self, n_layers: int, *, max_new_per_step: int = 512, **kwargs) -> KVCache:
        """A cache for `n_layers` layers like this one: a ring buffer for a windowed layer,
        else contiguous K/V (`Transformer.new_cache` calls this); encoder K/V for cross mode."""
        if self.cross:
            kwargs.pop("initial_len", None)  # a source arrives whole: nothing to grow into
            return EncoderCache(n_layers, self.n_kv_heads, self.head_dim, **kwargs)
        if self.window is None:
            return ContiguousCache(n_layers, self.n_kv_heads, self.head_dim, **kwargs)
        for unused in ("initial_len", "max_len"):  # sizes of growing caches; a ring is fixed
            kwargs.pop(unused, None)
        return SlidingWindowCache(
            n_layers,
            self.n_kv_heads,
            self.head_dim,
            window=self.window,
            sinks=self.sinks,
            max_new_per_step=max_new_per_step,
            **kwargs,
        )

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        if self.cross:
            return self._cross_forward(x, ctx)
        b, t, _ = x.shape
        # (B, T, H·d) -> (B, H, T, d)
        q, k, v = project(x, (self.wq, self.wk, self.wv))
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rotate = {"interleaved": ctx.interleaved, "phasors": ctx.phasors}
        q = apply_rotary(q, ctx.cos, ctx.sin, **rotate)
        k = apply_rotary(k, ctx.cos, ctx.sin, **rotate)
        return self.wo(self.attend(q, k, v, ctx))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Attention of rotated q, k and v `(batch, heads, seq, d)` over the cache (which
        stores k and v) or, without one, over themselves; `(batch, seq, heads · d)`, before
        the output projection."""
        if ctx.cache is not None:
            if ctx.cache.wants_queries:
                cache_call(ctx.cache.record_queries, self.layer_idx, q)
            out = cache_call(ctx.cache.attend, self.layer_idx, q, k, v, self.pattern, self.backend)
        else:
            out = attention(q, k, v, narrow_mask(ctx.mask, self.pattern), backend=self.backend)
        b, _, t, _ = q.shape
        return out.transpose(1, 2).reshape(b, t, -1)

    def _cross_forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        """Decoder queries over encoder K/V: projected from `ctx.memory` or read from the cache."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        cache = ctx.cross_cache
        if cache is not None and cache.holds(self.layer_idx):
            if cache.step.batch != b:
                raise ValueError(
                    f"x has batch {b} but the cross cache selected {cache.step.batch} sequences"
                )
            k, v, mask = cache.read(self.layer_idx)
        else:
            memory, lengths = self._check_memory(ctx, b)
            if lengths is not None:  # keys past the longest source are padding everywhere
                memory = memory[:, : int(lengths.max())] if b else memory
            s = memory.shape[1]
            # (B, S, Hkv·d) -> (B, Hkv, S, d)
            k = self.wk(memory).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.wv(memory).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if cache is not None:
                cache.store(self.layer_idx, k, v, lengths)
                k, v, mask = cache.read(self.layer_idx)
            else:
                # Key padding only: a positional (causal) mask here would be aligned
                # bottom-right and hide real source tokens from early target positions.
                mask = None if lengths is None else padding(lengths)
        out = attention(q, k, v, mask, backend=self.backend)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def _check_memory(self, ctx: AttentionContext, batch: int) -> tuple[Tensor, Tensor | None]:
        """`ctx.memory` and `ctx.memory_lengths`, or a ValueError/TypeError saying what is wrong."""
        memory = ctx.memory
        if memory is None:
            raise ValueError(
                f"cross-attention layer {self.layer_idx} needs ctx.memory (the encoder output, "
                f"(batch, src_len, {self.memory_hidden})) unless ctx.cross_cache holds its K/V"
            )
        if not isinstance(memory, Tensor):
            raise TypeError(f"ctx.memory must be a tensor, got {type(memory).__name__}")
        if memory.dim() != 3 or memory.shape[0] != batch or memory.shape[2] != self.memory_hidden:
            raise ValueError(
                f"ctx.memory must be (batch={batch}, src_len, memory_hidden={self.memory_hidden}), "
                f"got {tuple(memory.shape)}"
            )
        if memory.dtype != self.wk.weight.dtype:
            raise TypeError(
                f"ctx.memory has dtype {memory.dtype} but the layer's weights are "
                f"{self.wk.weight.dtype}"
            )
        lengths = ctx.memory_lengths
        if lengths is not None:
            lengths = check_source_lengths(lengths, batch, memory.shape[1])
        return memory, lengths


def cross_options(
    cross: bool, memory_hidden: int | None, hidden: int, pattern: Mask | None
) -> tuple[bool, int]:
    """Validated `(cross, memory_hidden)`; a cross layer has no window or pattern."""
    if not isinstance(cross, bool):
        raise TypeError(f"cross must be a bool, got {type(cross).__name__}")
    if memory_hidden is not None and not cross:
        raise ValueError(f"memory_hidden={memory_hidden} is only for cross=True layers")
    if cross and pattern is not None:
        raise ValueError(f"a cross-attention layer sees the whole source; got mask {pattern!r}")
    width = hidden if memory_hidden is None else memory_hidden
    return cross, check_positive_int("memory_hidden", width)


def layer_pattern(window: int | None, n_sinks: int, pattern: Mask | None) -> Mask | None:
    """The mask a layer applies instead of plain causal: its window (+ sinks) or `pattern`."""
    if pattern is not None and not isinstance(pattern, Mask):
        raise TypeError(f"pattern must be an attnkit mask, got {type(pattern).__name__}")
    if isinstance(n_sinks, bool) or not isinstance(n_sinks, int) or n_sinks < 0:
        raise ValueError(f"sinks must be an integer >= 0, got {n_sinks!r}")
    if window is None:
        if n_sinks:
            raise ValueError(f"sinks={n_sinks} needs a window: sinks only matter beside one")
        return pattern
    if pattern is not None:
        raise ValueError(f"give window={window} or pattern={pattern!r}, not both")
    check_positive_int("window", window)
    return window_and_sinks_mask(window, n_sinks)
