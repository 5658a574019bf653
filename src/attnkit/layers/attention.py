"""Multi-head attention with grouped K/V heads (MHA / GQA / MQA), rotary positions and a cache."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from attnkit.cache.base import KVCache
from attnkit.cache.contiguous import ContiguousCache
from attnkit.layers.rope import apply_rotary
from attnkit.ops.attention import attention
from attnkit.ops.masks import Mask


@dataclass(frozen=True)
class AttentionContext:
    """What every attention layer of one forward pass shares (computed once per pass)."""

    cos: Tensor  # (seq,) or (batch, seq) positions' angles, (..., rotary_dim // 2)
    sin: Tensor
    mask: Mask | None
    cache: KVCache | None
    interleaved: bool  # RoPE layout: adjacent pairs (GGUF) or half-split (Hugging Face)


class Attention(nn.Module):
    """Self-attention: `wq`, `wk`, `wv`, `wo` projections; K/V heads shared by query groups.

    x: (batch, seq, hidden) -> (batch, seq, hidden). With a cache in the context, the new
    K/V are stored and attention runs over everything the cache holds for the sequences.
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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.layer_idx, self.n_heads, self.n_kv_heads, self.head_dim = (
            layer_idx,
            n_heads,
            n_kv_heads,
            head_dim,
        )
        self.backend = backend
        self.wq = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_heads * head_dim, hidden, bias=out_bias)

    def new_cache(self, n_layers: int, **kwargs) -> KVCache:
        """A contiguous K/V cache for `n_layers` layers like this one (`Transformer.new_cache`)."""
        return ContiguousCache(n_layers, self.n_kv_heads, self.head_dim, **kwargs)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        b, t, _ = x.shape
        # (B, T, H·d) -> (B, H, T, d)
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, ctx.cos, ctx.sin, interleaved=ctx.interleaved)
        k = apply_rotary(k, ctx.cos, ctx.sin, interleaved=ctx.interleaved)
        if ctx.cache is not None:
            if ctx.cache.wants_queries:
                ctx.cache.record_queries(self.layer_idx, q)
            k, v = ctx.cache.update(self.layer_idx, k, v)
        out = attention(q, k, v, ctx.mask, backend=self.backend)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))
