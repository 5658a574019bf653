"""Causal linear attention as a drop-in attention layer, decoding through a recurrent state."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit._checks import check_positive_int
from attnkit.cache.linear_state import LinearStateCache
from attnkit.layers.attention import AttentionContext
from attnkit.layers.projection import Linear
from attnkit.ops.linear import feature_dim, linear_attention
from attnkit.ops.masks import causal


class LinearAttention(nn.Module):
    """Linear attention with `wq`, `wk`, `wv`, `wo` projections and GQA-style shared K/V heads.

    x: (batch, seq, hidden) -> (batch, seq, hidden), always causal. There are no rotary
    positions: `ctx.cos` / `ctx.sin` are ignored (order enters only through causality).
    Without a cache the whole sequence runs in the chunkwise form; with a
    `LinearStateCache` in the context the layer continues each sequence from its state
    (chunkwise for a prefill chunk, recurrent for one token) and writes the new state back,
    so memory per sequence stays constant however long it grows.
    """

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        v_head_dim: int | None = None,
        feature_map: str = "elu",
        chunk_size: int = 64,
        eps: float = 1e-6,
        qkv_bias: bool = False,
        out_bias: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden", hidden),
            ("n_heads", n_heads),
            ("n_kv_heads", n_kv_heads),
            ("head_dim", head_dim),
            ("chunk_size", chunk_size),
        ):
            check_positive_int(name, value)
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.v_head_dim = (
            head_dim if v_head_dim is None else check_positive_int("v_head_dim", v_head_dim)
        )
        self.feature_dim = feature_dim(feature_map, head_dim)  # also checks the name
        self.layer_idx, self.n_heads, self.n_kv_heads, self.head_dim = (
            layer_idx,
            n_heads,
            n_kv_heads,
            head_dim,
        )
        self.feature_map, self.chunk_size, self.eps = feature_map, chunk_size, eps
        self.wq = Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.wk = Linear(hidden, n_kv_heads * head_dim, bias=qkv_bias)
        self.wv = Linear(hidden, n_kv_heads * self.v_head_dim, bias=qkv_bias)
        self.wo = Linear(n_heads * self.v_head_dim, hidden, bias=out_bias)

    def new_cache(
        self,
        n_layers: int,
        *,
        max_seqs: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> LinearStateCache:
        """The recurrent state for `n_layers` layers like this one (`Transformer.new_cache`).

        Half-precision models keep the state in float32: it is a running sum over the whole
        sequence, and 10 or 7 mantissa bits would drop the small late terms.
        """
        if dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        return LinearStateCache(
            n_layers,
            self.n_kv_heads,
            self.feature_dim,
            self.v_head_dim,
            max_seqs=max_seqs,
            dtype=dtype,
            device=device,
        )

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        b, t, _ = x.shape
        # (B, T, H·d) -> (B, H, T, d)
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.v_head_dim).transpose(1, 2)
        options = dict(feature_map=self.feature_map, chunk_size=self.chunk_size, eps=self.eps)
        cache = ctx.cache
        if cache is None:
            if ctx.mask is not None and ctx.mask != causal():
                raise ValueError(
                    f"LinearAttention is always causal and cannot apply the mask {ctx.mask!r}; "
                    "pass mask=None or causal()"
                )
            out = linear_attention(q, k, v, **options)
        elif isinstance(cache, LinearStateCache):
            state = cache.state(self.layer_idx)
            form = "recurrent" if t == 1 else "chunkwise"
            out, state = linear_attention(
                q, k, v, form=form, state=state, return_state=True, **options
            )
            cache.set_state(self.layer_idx, *state)
        else:
            raise TypeError(
                f"LinearAttention keeps its state in a LinearStateCache, got "
                f"{type(cache).__name__}; build the cache with model.new_cache() or "
                f"LinearAttention.new_cache()"
            )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))
