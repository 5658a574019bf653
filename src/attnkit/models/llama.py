"""A Llama-family decoder (Llama 2/3, SmolLM2, Mistral-style GQA) built from attnkit layers.

Read top to bottom: RMSNorm, FeedForward (SwiGLU), Block (pre-norm attention + MLP),
Transformer (embedding, blocks, final norm, LM head). The attention layer is pluggable:
`Block` takes any module with `forward(x, ctx: AttentionContext)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._checks import check_positive_int
from attnkit.cache.base import KVCache, cache_call
from attnkit.cache.layered import LayeredCache
from attnkit.cache.paged import PagedCache
from attnkit.layers.attention import Attention, AttentionContext
from attnkit.layers.latent import LatentAttention
from attnkit.layers.projection import Linear, project
from attnkit.layers.rope import RopeScaling, RotaryEmbedding
from attnkit.models.stacked_decode import StackedDecode
from attnkit.ops import decode_block
from attnkit.ops.backends.banded import SOURCE as BANDED_SOURCE
from attnkit.ops.cpp_build import load_kernel
from attnkit.ops.decode_block import BlockWeights, LatentBlockWeights
from attnkit.ops.masks import causal
from attnkit.ops.rms_norm import rms_norm
from attnkit.ops.skinny_linear import MAX_ROWS
from attnkit.ops.transforms import needs_torch_ops

LAYER_TYPES = ("full_attention", "sliding_attention")

# A long prefill into a lossless cache on CPU runs through the blocks this many tokens at a
# time: each piece's activations (SmolLM2's MLP products: 12.6 MB each at 2,048 rows) are
# reused from the allocator and stay in the last-level cache, where a whole 8k prompt
# faulted in fresh 50 MB buffers every layer (8k prefill 6-11% faster on a Zen 5 host).
PREFILL_PIECE = 2048


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters; names follow Hugging Face's LlamaConfig where they exist."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    rope_interleaved: bool = False  # True for GGUF weights (adjacent-pair layout)
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on the q, k, v projections (Qwen2, some Llamas)
    attention_out_bias: bool = False  # a bias on the output projection (Llama's attention_bias)
    sliding_window: int | None = None  # keys a windowed layer sees, itself included (Mistral)
    # Per layer "full_attention" or "sliding_attention" (Hugging Face's names; Gemma-2,
    # Qwen2 alternate). None: every layer slides if sliding_window is set, else none does.
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            check_positive_int(f"LlamaConfig.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"LlamaConfig.hidden_size ({self.hidden_size}) is not divisible by "
                    f"num_attention_heads ({self.num_attention_heads}); give head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not self.rms_norm_eps > 0:
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.sliding_window is not None:
            check_positive_int("LlamaConfig.sliding_window", self.sliding_window)
        if self.layer_types is not None:
            self._check_layer_types()

    def _check_layer_types(self) -> None:
        types = tuple(self.layer_types)
        object.__setattr__(self, "layer_types", types)
        if len(types) != self.num_hidden_layers:
            raise ValueError(
                f"LlamaConfig.layer_types names {len(types)} layers, but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"LlamaConfig.layer_types has {unknown}; allowed: {LAYER_TYPES}")
        if "sliding_attention" in types and self.sliding_window is None:
            raise ValueError("LlamaConfig.layer_types has sliding layers but no sliding_window")

    def window_of(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for a global (full attention) layer."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in float32 (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate = Linear(hidden, intermediate, bias=False)
        self.up = Linear(hidden, intermediate, bias=False)
        self.down = Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = project(x, (self.gate, self.up))
        if needs_torch_ops(gate, up):
            return self.down(F.silu(gate) * up)
        # in place: no two fresh (rows, intermediate) tensors (8k prefill: 2% of its time)
        return self.down(F.silu(gate, inplace=True).mul_(up))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, attn: nn.Module) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = attn
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        weights = self._decode_weights(x, ctx)
        if weights is not None:
            return self._fused_forward(x, ctx, weights)
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))

    def _plain_parts(
        self, attention: type[nn.Module], projections: tuple[str, ...]
    ) -> tuple[nn.Module, list[dict]] | None:
        """The attention layer and the parameter registries of its four `projections` and
        the MLP's gate, up and down, when the block is made of plain modules (exactly
        `attention`, FeedForward, RMSNorm and Linear, no hooks) and the MLP has no biases
        (`block_outputs` takes none); else None."""
        # Submodules and parameters are read from their registries: nn.Module.__getattr__
        # costs ~1 us a read here (~60 us a layer and step, 4% of a decode step).
        modules = self._modules
        attn, mlp = modules["attn"], modules["mlp"]
        if not (_plain(attn, attention) and _plain(mlp, FeedForward)):
            return None
        if not (_plain(modules["attn_norm"], RMSNorm) and _plain(modules["mlp_norm"], RMSNorm)):
            return None
        linears = [attn._modules.get(n) for n in projections]  # (an MLA query latent: no wq)
        linears += [mlp._modules[n] for n in ("gate", "up", "down")]
        if not all(_plain(m, Linear) for m in linears):
            return None
        params = [m._parameters for m in linears]
        if any(p["bias"] is not None for p in params[4:]):
            return None
        return attn, params

    def _decode_weights(self, x: Tensor, ctx: AttentionContext) -> BlockWeights | None:
        """The block's tensors when this step can take the fused decode calls
        (`ops.decode_block`: a few float32 CPU rows through this file's own layers, with no
        forward hooks that the fused calls would skip)."""
        if x.shape[0] * x.shape[1] > MAX_ROWS or _global_hooks():
            return None
        parts = self._plain_parts(Attention, ("wq", "wk", "wv", "wo"))
        if parts is None or parts[0].cross:
            return None
        _, params = parts
        attn_norm, mlp_norm = self._modules["attn_norm"], self._modules["mlp_norm"]
        weights = BlockWeights(
            (attn_norm._parameters["weight"], attn_norm.eps),
            tuple(p["weight"] for p in params[:3]),
            tuple(p["bias"] for p in params[:3]),
            (params[3]["weight"], params[3]["bias"]),
            (mlp_norm._parameters["weight"], mlp_norm.eps),
            tuple(p["weight"] for p in params[4:]),
        )
        tensors = [weights.attn_norm[0], *weights.qkv, *weights.qkv_bias, *weights.wo]
        tensors += [weights.mlp_norm[0], *weights.mlp, ctx.cos, ctx.sin]
        return weights if decode_block.fusable(x, tensors) else None

    def _latent_decode_weights(self, x: Tensor, ctx: AttentionContext) -> LatentBlockWeights | None:
        """The tensors of an MLA block (`LatentAttention` without a query latent, in its
        own modules, absorbed or `auto` mode with the `auto` backend) when this step can
        take `LatentDecodeStack`, else None."""
        parts = self._plain_parts(LatentAttention, ("wq", "wkv_a", "wkv_b", "wo"))
        if parts is None:
            return None
        attn, params = parts
        if attn.q_rank is not None or attn.mode == "naive" or attn.backend != "auto":
            return None
        if max(attn.rope_pairs) >= ctx.cos.shape[-1]:
            return None  # the layer itself names the problem
        kv_norm = attn.kv_norm
        if kv_norm is not None and not (_plain(kv_norm, nn.RMSNorm) and kv_norm.weight is not None):
            return None
        if params[2]["bias"] is not None:  # W_uk and W_uv are absorbed: no bias to carry
            return None
        attn_norm, mlp_norm = self._modules["attn_norm"], self._modules["mlp_norm"]
        kv_eps = None
        if kv_norm is not None:
            eps = torch.finfo(torch.float32).eps if kv_norm.eps is None else kv_norm.eps
            kv_eps = (kv_norm.weight, eps)
        weights = LatentBlockWeights(
            (attn_norm._parameters["weight"], attn_norm.eps),
            (params[0]["weight"], params[0]["bias"]),
            (params[1]["weight"], params[1]["bias"]),
            kv_eps,
            params[2]["weight"],
            (params[3]["weight"], params[3]["bias"]),
            (mlp_norm._parameters["weight"], mlp_norm.eps),
            tuple(p["weight"] for p in params[4:]),
        )
        tensors = [weights.attn_norm[0], weights.mlp_norm[0], *weights.mlp, ctx.cos, ctx.sin]
        tensors += [*weights.wq, *weights.wkv_a, weights.wkv_b, *weights.wo]
        tensors += [] if kv_eps is None else [kv_eps[0]]
        return weights if decode_block.fusable(x, tensors) else None

    def _fused_forward(self, x: Tensor, ctx: AttentionContext, w: BlockWeights) -> Tensor:
        """`forward` in two C++ calls around attention: norm + q/k/v + RoPE, then the
        output projection, norm, MLP and both residuals."""
        attn = self._modules["attn"]
        q, k, v = decode_block.attention_inputs(
            x,
            *w.attn_norm,
            w.qkv,
            w.qkv_bias,
            *ctx.angles_by_row(x.shape[0], x.shape[1]),
            (attn.n_heads, attn.n_kv_heads),
            attn.head_dim,
            ctx.interleaved,
        )
        out = attn.attend(q, k, v, ctx)
        return decode_block.block_outputs(x, out, *w.wo, *w.mlp_norm, w.mlp)


INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def _check_logits_at(logits_at: Tensor, batch: int, seq: int, last_only: bool) -> None:
    if last_only:
        raise ValueError("pass last_only=True or logits_at, not both")
    # (uint8 and bool index tensors are masks to torch)
    if tuple(logits_at.shape) != (batch,) or logits_at.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"logits_at must be (batch,) = ({batch},) integer positions, got "
            f"{tuple(logits_at.shape)} {logits_at.dtype}"
        )
    if batch and not (int(logits_at.min()) >= 0 and int(logits_at.max()) < seq):
        raise ValueError(
            f"logits_at must lie in [0, seq = {seq}), got [{int(logits_at.min())}, "
            f"{int(logits_at.max())}]"
        )


def _rows_at(x: Tensor, positions: Tensor) -> Tensor:
    """`x[b, positions[b]]` for each row b of `x` `(batch, seq, ...)`, as `(batch, 1, ...)`."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, positions.to(x.device)].unsqueeze(1)


def _plain(module: nn.Module, kind: type) -> bool:
    """Whether `module` is exactly `kind` (no subclass or stand-in), with no forward hooks
    and no `forward` of its own set on the instance."""
    if type(module) is not kind or "forward" in module.__dict__:
        return False
    return not _hooked(module)


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has forward hooks of its own (pre or post)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    """Whether forward hooks are registered for every module (torch keeps them here)."""
    hooks = torch.nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks)


def rotary_for(config: LlamaConfig) -> RotaryEmbedding:
    """The model's rotary embedding (its frequencies are derived, never stored as weights)."""
    return RotaryEmbedding(
        config.head_dim,
        config.rope_theta,
        interleaved=config.rope_interleaved,
        scaling=config.rope_scaling,
    )


AttentionFactory = Callable[[LlamaConfig, int], nn.Module]


def default_attention(config: LlamaConfig, layer_idx: int) -> nn.Module:
    """Rotary GQA attention, as in Llama; windowed where the config says so (Mistral)."""
    return Attention(
        layer_idx,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        qkv_bias=config.attention_bias,
        out_bias=config.attention_out_bias,
        window=config.window_of(layer_idx),
    )


class Transformer(nn.Module):
    """The decoder: `model(input_ids, cache=None, positions=None, seq_ids=None)` -> logits."""

    def __init__(self, config: LlamaConfig, attention: AttentionFactory = default_attention):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(
            Block(config, attention(config, i)) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = rotary_for(config)
        self._stacked_decode = StackedDecode(Block)

    def new_cache(self, batch: int = 1, **kwargs) -> KVCache:
        """An empty cache for this model's attention layers, holding `batch` empty sequences.

        Each attention layer kind knows what it stores (K/V, a ring buffer, a latent, a
        recurrent state): layers of one `cache_kind` share a cache built by their
        `new_cache(n_layers, max_seqs=, dtype=, device=, **kwargs)`; a model mixing kinds
        (windowed and global layers) gets a `LayeredCache` of them. Keyword arguments go to
        the caches (e.g. `initial_len` for K/V caches, `max_new_per_step` for rings).
        """
        p = next(self.parameters())
        options = {
            "max_seqs": kwargs.pop("max_seqs", batch),
            "dtype": kwargs.pop("dtype", p.dtype),
            "device": kwargs.pop("device", p.device),
            **kwargs,
        }
        groups: dict[object, list[int]] = {}
        for i, block in enumerate(self.blocks):
            groups.setdefault(getattr(block.attn, "cache_kind", type(block.attn)), []).append(i)
        caches = [
            (layers, self.blocks[layers[0]].attn.new_cache(len(layers), **options))
            for layers in groups.values()
        ]
        cache = caches[0][1] if len(caches) == 1 else LayeredCache(caches)
        for _ in range(batch):
            cache.add_sequence()
        return cache

    def new_paged_cache(self, num_blocks: int, block_size: int = 16, **kwargs) -> KVCache:
        """An empty paged cache for this model (the continuous-batching scheduler's), its
        dtype and device the model's: a `PagedCache` of `num_blocks` blocks. When every
        layer slides with one window (and sinks), the cache gets that window too, and so
        gives back the blocks behind it. A model mixing windowed and global layers gets a
        `LayeredCache` of one such pool per kind of layer, each of `num_blocks` blocks of
        its own layers (the bytes of one pool of `num_blocks` over every layer): its
        windowed layers' pool gives back blocks, the global layers' keeps every token.
        Keyword arguments go to each `PagedCache`; a `window` given makes one pool of that
        window for every layer (keeping the model's sinks unless `sinks` is given too;
        `window=None` drops them)."""
        layers = [block.attn for block in self.blocks]
        if not all(isinstance(a, Attention) and not a.cross for a in layers):
            cross = [" (cross)" if getattr(a, "cross", False) else "" for a in layers]
            names = sorted({type(a).__name__ + c for a, c in zip(layers, cross, strict=True)})
            raise ValueError(
                "new_paged_cache serves K/V self-attention layers (Attention), this model has "
                f"{', '.join(names)}"
            )
        heads = {(a.n_kv_heads, a.head_dim) for a in layers}
        if len(heads) != 1:
            raise ValueError(f"new_paged_cache needs one K/V shape in every layer, got {heads}")
        kv_heads, head_dim = heads.pop()
        groups: dict[tuple[int | None, int], list[int]] = {}
        for i, attn in enumerate(layers):
            groups.setdefault((attn.window, attn.sinks), []).append(i)
        if "window" in kwargs or len(groups) == 1:
            window, sinks = next(iter(groups)) if len(groups) == 1 else (None, 0)
            groups = {(window, sinks): list(range(len(layers)))}
        p = next(self.parameters())

        def pool(n_layers: int, window: int | None, sinks: int) -> PagedCache:
            options = {"dtype": p.dtype, "device": p.device, "window": window, "sinks": sinks}
            options |= kwargs
            if options["window"] is None:  # no window: no sinks either
                options["sinks"] = kwargs.get("sinks", 0)
            return PagedCache(
                n_layers, kv_heads, head_dim, num_blocks=num_blocks, block_size=block_size,
                **options,
            )  # fmt: skip

        caches = [(ids, pool(len(ids), *seen)) for seen, ids in groups.items()]
        return caches[0][1] if len(caches) == 1 else LayeredCache(caches)

    def forward(
        self,
        input_ids: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        seq_ids: list[int] | None = None,
        *,
        last_only: bool = False,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Logits `(batch, seq, vocab)` for `input_ids` `(batch, seq)`.

        `last_only=True` returns the last position's logits alone, `(batch, 1, vocab)`: all a
        generation step needs, without the LM head's matmul over every prompt token.
        `logits_at` (`(batch,)` integer positions) returns each row's logits at its own
        position, `(batch, 1, vocab)`: the last real token of right-padded prompts.

        Without a cache, the sequences start at position 0 under a causal mask. With one,
        the tokens extend the cached sequences `seq_ids` (default: all of the cache's
        sequences, in order) and attention covers everything cached. `positions` overrides
        the RoPE positions (default: where each token lands in its sequence). A cache that
        takes at most `max_step_tokens` per step (a ring buffer) is fed in steps that size;
        a long prefill into a lossless cache on CPU goes in pieces of `PREFILL_PIECE` tokens
        (`_piece_tokens` says when), with the same logits.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        if logits_at is not None:
            _check_logits_at(logits_at, b, t, last_only)
        if positions is not None and positions.shape[-1] != t:
            raise ValueError(
                f"positions must hold one position per token: last dim {t}, got shape "
                f"{tuple(positions.shape)}"
            )
        if cache is not None and torch.compiler.is_compiling():
            # The whole forward outside the graph (cache-free forwards compile). `forward`,
            # not `self(...)`: the hooks have run, and after `model.compile()` the call would
            # go back through the compiled one, recursing.
            return cache_call(
                self.forward,
                input_ids,
                cache,
                positions,
                seq_ids,
                last_only=last_only,
                logits_at=logits_at,
            )
        piece = self._piece_tokens(cache, t)
        if piece is None:
            x = self._hidden(input_ids, cache, positions, seq_ids)
        else:
            x = self._hidden_in_pieces(input_ids, cache, positions, seq_ids, piece, last_only)
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = _rows_at(x, logits_at)
        return self.lm_head(self.norm(x))

    def _piece_tokens(self, cache: KVCache | None, tokens: int) -> int | None:
        """Tokens per pass through the blocks when `tokens` go into `cache` in several, or
        None for one pass: the cache's own limit (rings), else `PREFILL_PIECE` where pieces
        compute what the whole input would and were measured faster: a cache whose reads
        do not depend on how the prompt was split (`exact_in_pieces`), RoPE without dynamic
        NTK (its frequencies follow each call's longest position), float32 on CPU with the
        banded kernel built, plain `Attention` layers on `auto`, and no forward hooks (they
        would see pieces)."""
        if cache is None:
            return None
        limit = cache.max_step_tokens
        if limit is not None:
            return limit if tokens > limit else None
        if tokens <= PREFILL_PIECE or not cache.exact_in_pieces:
            return None
        weights = self.embed.weight
        if weights.device.type != "cpu" or weights.dtype != torch.float32:
            return None
        if self.config.rope_scaling.kind == "dynamic" or load_kernel(BANDED_SOURCE) is None:
            return None
        for block in self.blocks:
            attn = block.attn
            if type(attn) is not Attention or attn.cross or attn.backend != "auto":
                return None
        hooked = any(_hooked(m) for m in self.blocks.modules())
        return None if hooked or _global_hooks() else PREFILL_PIECE

    def _hidden_in_pieces(self, input_ids, cache, positions, seq_ids, piece, last_only) -> Tensor:
        """`_hidden` over `input_ids` `piece` tokens at a time (the last piece's alone with
        `last_only`). Where a piece fails (`CacheFull`), a lossless cache is left as it was
        before the first, as one pass would leave it (a ring cannot take back what it
        overwrote)."""
        seqs = list(cache.sequences if seq_ids is None else seq_ids)
        starts = []
        if cache.exact_in_pieces and len(seqs) == input_ids.shape[0]:
            starts = [cache.length(seq) for seq in seqs]
        kept = []  # hidden states, not logits: the LM head runs once, on the rows asked for
        try:
            for i in range(0, input_ids.shape[1], piece):
                part = slice(i, i + piece)
                at = None if positions is None else positions[..., part]
                h = self._hidden(input_ids[:, part], cache, at, seq_ids)
                kept = [h] if last_only else [*kept, h]
        except BaseException:
            for seq, start in zip(seqs, starts, strict=False):
                cache.truncate(seq, start)
            raise
        return torch.cat(kept, dim=1)

    def _hidden(self, input_ids, cache, positions, seq_ids) -> Tensor:
        """The last block's output `(batch, seq, hidden)` for one pass (see `forward`)."""
        b, t = input_ids.shape
        if cache is not None:
            seq_ids = cache.sequences if seq_ids is None else seq_ids
            if len(seq_ids) != b:
                raise ValueError(
                    f"input_ids has batch {b} but seq_ids names {len(seq_ids)} sequences "
                    f"{list(seq_ids)}; pass seq_ids= with one sequence per row"
                )
            step = cache.prepare(seq_ids, t, token_ids=input_ids)
            mask, default_positions = step.mask, step.positions
        else:
            mask = causal()
            default_positions = torch.arange(t, device=input_ids.device)
        positions = default_positions if positions is None else positions
        x = self.embed(input_ids)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        ctx = AttentionContext(cos, sin, mask, cache, self.config.rope_interleaved)
        stacked = self._stacked_decode(self.blocks, x, ctx, _global_hooks())
        if stacked is not None:  # a decode step, every block in one call
            return stacked
        for block in self.blocks:
            x = block(x, ctx)
        return x
