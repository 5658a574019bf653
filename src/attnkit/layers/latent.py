"""Multi-head latent attention (MLA, DeepSeek-V2/V3): K/V compressed into one cached latent."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnkit._checks import check_positive_int
from attnkit.cache.base import cache_call
from attnkit.cache.latent import LatentCache
from attnkit.cache.layered import LayeredCache
from attnkit.layers.attention import AttentionContext
from attnkit.layers.projection import Linear
from attnkit.layers.rope import apply_rotary
from attnkit.ops.attention import attention
from attnkit.ops.latent_decode import latent_decode
from attnkit.ops.masks import causal, padding_lengths

MODES = ("auto", "naive", "absorbed")


class LatentAttention(nn.Module):
    """MLA with DeepSeek-V3's names: `wq` (or `wq_a`, `q_norm`, `wq_b`), `wkv_a`, `wkv_b`, `wo`.

    x: (batch, seq, hidden) -> (batch, seq, hidden). `wkv_a` maps each token to a latent
    c of `kv_rank` values plus a RoPE key of `rope_heads` x `rope_dim` values; only these
    are cached. Query head h's key is [W_uk_h c ; RoPE key of head h // (n_heads /
    rope_heads)] and its value W_uv_h c, with W_uk_h (nope_dim x kv_rank) and W_uv_h
    (v_head_dim x kv_rank) slices of `wkv_b`. DeepSeek shares one RoPE key (rope_heads=1);
    more RoPE heads let a GQA model convert exactly (`models.convert.mla`). Scores scale by
    `scale`, default 1/sqrt(nope_dim + rope_dim).

    Modes, equal up to rounding: `naive` up-projects the latent to per-head K/V and attends;
    `absorbed` folds W_uk_h into the query and W_uv_h into the output and attends over
    [c ; RoPE key] directly, MQA-style with `rope_heads` KV heads (DeepSeek-V2 sec. 2.1.2).
    `auto` (the default) takes whichever needs fewer multiply-adds for the step: absorbed
    for decoding (few queries: no per-head K/V is ever built), naive for prefill chunks
    (many queries: scores over head dims, not over the wider latent), as vLLM serves MLA.
    With `backend="triton"`, absorbed decode steps (one query per sequence, one RoPE head)
    run the fused kernel of `ops.latent_decode`, which reads each cached latent once.

    RoPE angles come from the context (the Transformer's `RotaryEmbedding`, sized by
    `config.head_dim`): rotary pair j of the RoPE dims uses angle column `rope_pairs[j]` of
    `ctx.cos`/`ctx.sin` (default 0 .. rope_dim/2 - 1). A model built for MLA sets
    `config.head_dim = rope_dim`, giving DeepSeek's frequencies; a converted model keeps
    its own and picks the columns of the pairs it kept (a column may repeat).
    """

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        n_heads: int,
        *,
        kv_rank: int,
        rope_dim: int,
        nope_dim: int,
        v_head_dim: int,
        q_rank: int | None = None,
        rope_heads: int = 1,
        rope_pairs: Sequence[int] | None = None,
        q_norm: bool = True,
        kv_norm: bool = True,
        norm_eps: float = 1e-6,
        scale: float | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        mode: str = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden", hidden),
            ("n_heads", n_heads),
            ("kv_rank", kv_rank),
            ("v_head_dim", v_head_dim),
            ("rope_heads", rope_heads),
        ):
            check_positive_int(name, value)
        if isinstance(nope_dim, bool) or not isinstance(nope_dim, int) or nope_dim < 0:
            raise ValueError(f"nope_dim must be an integer >= 0, got {nope_dim!r}")
        if (
            isinstance(rope_dim, bool)
            or not isinstance(rope_dim, int)
            or rope_dim < 2
            or rope_dim % 2
        ):
            raise ValueError(f"rope_dim must be an even integer >= 2, got {rope_dim!r}")
        if q_rank is not None:
            check_positive_int("q_rank", q_rank)
        if n_heads % rope_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of rope_heads ({rope_heads})")
        pairs = tuple(range(rope_dim // 2)) if rope_pairs is None else tuple(rope_pairs)
        if len(pairs) != rope_dim // 2 or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pairs
        ):
            raise ValueError(
                f"rope_pairs must be rope_dim/2 = {rope_dim // 2} integers >= 0 (angle columns "
                f"of ctx.cos), got {rope_pairs!r}"
            )
        self.layer_idx, self.hidden, self.n_heads = layer_idx, hidden, n_heads
        self.kv_rank, self.q_rank, self.rope_heads = kv_rank, q_rank, rope_heads
        self.nope_dim, self.rope_dim, self.v_head_dim = nope_dim, rope_dim, v_head_dim
        self.rope_pairs = pairs
        self._pair_prefix = pairs == tuple(range(len(pairs)))  # a slice, no gather
        self.register_buffer("_pair_index", torch.tensor(pairs), persistent=False)
        self.scale = 1.0 / math.sqrt(nope_dim + rope_dim) if scale is None else float(scale)
        self.backend = backend
        self.mode = mode
        qk_dim = nope_dim + rope_dim
        if q_rank is None:
            self.wq = Linear(hidden, n_heads * qk_dim, bias=qkv_bias)
        else:
            self.wq_a = Linear(hidden, q_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_rank, eps=norm_eps) if q_norm else None
            self.wq_b = Linear(q_rank, n_heads * qk_dim, bias=qkv_bias)
        self.wkv_a = Linear(hidden, kv_rank + rope_heads * rope_dim, bias=qkv_bias)
        self.kv_norm = nn.RMSNorm(kv_rank, eps=norm_eps) if kv_norm else None
        self.wkv_b = Linear(kv_rank, n_heads * (nope_dim + v_head_dim), bias=False)
        self.wo = Linear(n_heads * v_head_dim, hidden, bias=out_bias)

    @property
    def mode(self) -> str:
        """`"auto"`, `"naive"` or `"absorbed"`; switch at any time, the weights are the same."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    @property
    def cache_kind(self) -> tuple:
        """Layers with equal `cache_kind` can share one cache (`Transformer.new_cache`)."""
        return ("latent", self.kv_rank, self.rope_heads, self.rope_dim)

    @property
    def cache_values_per_token(self) -> int:
        """Values this layer caches per token: the latent plus its RoPE key heads."""
        return self.kv_rank + self.rope_heads * self.rope_dim

    def new_cache(
        self, n_layers: int, *, max_new_per_step: int | None = None, **kwargs
    ) -> LatentCache:
        """A latent cache for `n_layers` layers like this one (`Transformer.new_cache`).

        Keyword arguments go to `LatentCache` (max_seqs, dtype, device, initial_len,
        max_len); `max_new_per_step` is for ring buffers and ignored (a latent cache grows).
        """
        return LatentCache(
            n_layers, self.kv_rank, self.rope_dim, rope_heads=self.rope_heads, **kwargs
        )

    def _queries(self, x: Tensor) -> Tensor:
        if self.q_rank is None:
            return self.wq(x)
        low = self.wq_a(x)
        return self.wq_b(self.q_norm(low) if self.q_norm is not None else low)

    def _angles(self, ctx: AttentionContext) -> tuple[Tensor, Tensor]:
        columns = ctx.cos.shape[-1]
        if max(self.rope_pairs) >= columns:
            raise ValueError(
                f"LatentAttention rope_pairs use angle column {max(self.rope_pairs)} but the "
                f"context has {columns} (cos/sin sized for rotary dim {2 * columns}): build "
                f"the model with config.head_dim >= {2 * max(self.rope_pairs) + 2}"
            )
        if self._pair_prefix:
            n = len(self.rope_pairs)
            return ctx.cos[..., :n], ctx.sin[..., :n]
        index = self._pair_index.to(ctx.cos.device)
        return ctx.cos.index_select(-1, index), ctx.sin.index_select(-1, index)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise ValueError(
                f"x must be (batch, seq, hidden={self.hidden}), got shape {tuple(x.shape)}"
            )
        b, t, _ = x.shape
        h, rh = self.n_heads, self.rope_heads
        # (B, T, H·(nope+rope)) -> (B, H, T, nope+rope)
        q = self._queries(x).view(b, t, h, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.kv_rank, rh * self.rope_dim], dim=-1)
        if self.kv_norm is not None:
            latent = self.kv_norm(latent)
        k_rope = k_rope.view(b, t, rh, self.rope_dim).transpose(1, 2)  # (B, rh, T, rope)
        cos, sin = self._angles(ctx)
        q_rope = apply_rotary(q_rope, cos, sin, interleaved=ctx.interleaved)
        k_rope = apply_rotary(k_rope, cos, sin, interleaved=ctx.interleaved)
        if ctx.cache is not None:
            if not isinstance(ctx.cache, (LatentCache, LayeredCache)):
                raise TypeError(
                    f"LatentAttention caches latents in a LatentCache, got "
                    f"{type(ctx.cache).__name__}; build it with model.new_cache() or "
                    f"LatentAttention.new_cache()"
                )
            latent, k_rope = cache_call(ctx.cache.update, self.layer_idx, latent, k_rope)
            mask = cache_call(ctx.cache.layer_mask, self.layer_idx)
        else:
            mask = ctx.mask
        run = self._naive if self.step_mode(t, latent.shape[1]) == "naive" else self._absorbed
        out = run(q_nope, q_rope, latent, k_rope, mask)  # (B, H, T, v_head_dim)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def step_mode(self, n_queries: int, n_keys: int) -> str:
        """The mode a step of `n_queries` over `n_keys` cached tokens runs in."""
        if self._mode != "auto":
            return self._mode
        h, r, n, v = self.n_heads, self.kv_rank, self.nope_dim, self.v_head_dim
        qk = n + self.rope_dim
        # multiply-adds: naive builds every key's per-head K/V, then attends over head dims;
        # absorbed maps queries into the latent and attends over latent + RoPE dims.
        naive = n_keys * r * h * (n + v) + h * n_queries * n_keys * (qk + v)
        absorbed = h * n_queries * (n * r + r * v + n_keys * (2 * r + self.rope_dim))
        return "naive" if naive < absorbed else "absorbed"

    def _naive(self, q_nope, q_rope, latent, k_rope, mask) -> Tensor:
        b, s, h = latent.shape[0], latent.shape[1], self.n_heads
        # (B, S, H·(nope+v)) -> (B, H, S, nope+v): every head's K (no-RoPE part) and V
        kv = nn.functional.linear(latent, self.wkv_b.weight).view(b, s, h, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        k_rope = k_rope.repeat_interleave(h // self.rope_heads, dim=1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        return attention(q, k, v, mask, scale=self.scale, backend=self.backend)

    def _absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> Tensor:
        b, s = latent.shape[:2]
        w = self.wkv_b.weight.view(self.n_heads, self.nope_dim + self.v_head_dim, self.kv_rank)
        w_uk, w_uv = w.split([self.nope_dim, self.v_head_dim], dim=1)
        # q_nope·(W_uk c) = (W_uk^T q_nope)·c: queries move into latent space
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)
        lengths = self._decode_lengths(q_latent, latent, mask)
        if lengths is not None:  # one query per sequence: the fused kernel
            o = latent_decode(
                q_latent[:, :, 0],
                q_rope[:, :, 0],
                latent,
                k_rope[:, 0],
                lengths,
                scale=self.scale,
                backend="triton",
                check=False,  # the cache's own lengths
            )
            return torch.einsum("bhr,hvr->bhv", o, w_uv).unsqueeze(2)
        q = torch.cat([q_latent, q_rope], dim=-1)
        # The rope_heads "KV heads" share one latent; expand is a view, not a copy.
        shared = latent.unsqueeze(1).expand(b, self.rope_heads, s, self.kv_rank)
        k = torch.cat([shared, k_rope], dim=-1)
        o = attention(q, k, shared, mask, scale=self.scale, backend=self.backend)
        return torch.einsum("bhtr,hvr->bhtv", o, w_uv)  # W_uv c, summed after softmax

    def _decode_lengths(self, q_latent: Tensor, latent: Tensor, mask) -> Tensor | None:
        """Keys per sequence when this step runs the Triton MLA decode kernel (`backend=
        "triton"`, one query per sequence, one shared RoPE key, a mask that is key lengths
        or hides nothing); None for every other step."""
        if self.backend != "triton" or q_latent.shape[2] != 1 or self.rope_heads != 1:
            return None
        b, s = latent.shape[:2]
        if mask is None or mask == causal():  # one query, bottom-right: it sees every key
            return torch.full((b,), s, dtype=torch.int64, device=latent.device)
        lengths = padding_lengths(mask)
        return None if lengths is None else lengths.to(latent.device).expand(b)
