"""A small encoder-decoder (the original Transformer's shape, pre-norm) from attnkit layers.

Read top to bottom: Seq2SeqConfig; EncoderBlock (bidirectional self-attention over the
source, hiding its padding, then an MLP); DecoderBlock (causal self-attention, cross-attention
over the encoder output, MLP); Seq2SeqCache (the decoder's growing self-attention K/V beside
the static encoder K/V); Seq2Seq (shared embedding, encoder, decoder, LM head: `encode`,
`decode`, `forward` for teacher forcing, greedy `generate`). RoPE rotates self-attention only;
cross-attention compares decoder and encoder tokens by content, as in T5 and Whisper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit._checks import check_positive_int
from attnkit.cache.base import KVCache
from attnkit.cache.encoder import EncoderCache
from attnkit.layers.attention import Attention, AttentionContext
from attnkit.layers.projection import Linear
from attnkit.layers.rope import RotaryEmbedding
from attnkit.models.llama import FeedForward, RMSNorm
from attnkit.ops.masks import causal, padding


@dataclass(frozen=True)
class Seq2SeqConfig:
    """Hyper-parameters; source and target share one vocabulary and one embedding."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    encoder_layers: int
    decoder_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    pad_token_id: int = 0  # what generate emits after a sequence's end
    bos_token_id: int = 1  # the decoder's first input
    eos_token_id: int | None = 2  # generation stops at it; None: always max_new_tokens
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "encoder_layers",
            "decoder_layers",
            "num_attention_heads",
            "num_key_value_heads",
        ):
            check_positive_int(f"Seq2SeqConfig.{name}", getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Seq2SeqConfig.num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"Seq2SeqConfig.hidden_size ({self.hidden_size}) is not divisible by "
                    f"num_attention_heads ({self.num_attention_heads}); give head_dim"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        check_positive_int("Seq2SeqConfig.head_dim", self.head_dim)
        if not self.rms_norm_eps > 0:
            raise ValueError(f"Seq2SeqConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is None and name == "eos_token_id":
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Seq2SeqConfig.{name} must be an integer, got {value!r}")
            if not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"Seq2SeqConfig.{name} must be in [0, vocab_size={self.vocab_size}), "
                    f"got {value}"
                )

    def attention(self, layer_idx: int, *, cross: bool = False) -> Attention:
        """One GQA attention layer of this model (self- or cross-attention)."""
        return Attention(
            layer_idx,
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            cross=cross,
        )


class EncoderBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)) over the whole source (ctx.mask hides padding), then MLP."""

    def __init__(self, config: Seq2SeqConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = config.attention(layer_idx)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class DecoderBlock(nn.Module):
    """Pre-norm: causal self-attention, cross-attention over the encoder output, MLP."""

    def __init__(self, config: Seq2SeqConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = config.attention(layer_idx)
        self.cross_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross = config.attention(layer_idx, cross=True)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = FeedForward(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        x = x + self.cross(self.cross_norm(x), ctx)
        return x + self.mlp(self.mlp_norm(x))


class Seq2SeqCache:
    """The decoder's decoding state: self-attention K/V that grow by a token per step, and
    the encoder K/V each cross-attention layer stores at a request's first step.

    Both caches get every sequence operation together, so a sequence id means the same
    request in both.
    """

    def __init__(self, self_attn: KVCache, cross: EncoderCache) -> None:
        if self_attn.sequences or cross.sequences:
            raise ValueError("Seq2SeqCache needs two empty caches, so their sequence ids agree")
        self.self_attn, self.cross = self_attn, cross

    def add_sequence(self) -> int:
        return self._same(self.self_attn.add_sequence(), self.cross.add_sequence())

    def fork(self, seq: int) -> int:
        """A new sequence with `seq`'s decoded tokens and the same source."""
        return self._same(self.self_attn.fork(seq), self.cross.fork(seq))

    def free(self, seq: int) -> None:
        self.self_attn.free(seq)
        self.cross.free(seq)

    def truncate(self, seq: int, length: int) -> None:
        """Roll back decoded tokens; the source's K/V stay."""
        self.self_attn.truncate(seq, length)

    def length(self, seq: int) -> int:
        """Decoder tokens cached for `seq`."""
        return self.self_attn.length(seq)

    @property
    def sequences(self) -> list[int]:
        return self.self_attn.sequences

    @property
    def nbytes(self) -> int:
        return self.self_attn.nbytes + self.cross.nbytes

    @staticmethod
    def _same(a: int, b: int) -> int:
        if a != b:  # only if someone used the inner caches directly
            raise RuntimeError(f"the self and cross caches disagree on sequence ids ({a} != {b})")
        return a


class Seq2Seq(nn.Module):
    """Encoder-decoder: `model(src_ids, tgt_ids, src_mask=None)` -> logits (teacher forcing).

    Shapes: src_ids `(batch, src_len)`, src_mask `(batch, src_len)` bool, True on real tokens
    (right padding; None: no padding), tgt_ids `(batch, tgt_len)` starting with BOS; logits
    `(batch, tgt_len, vocab)`, row i predicting target token i + 1.
    """

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.encoder = nn.ModuleList(EncoderBlock(config, i) for i in range(config.encoder_layers))
        self.encoder_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(config, i) for i in range(config.decoder_layers))
        self.decoder_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta)

    def new_cache(self, batch: int = 1, **kwargs) -> Seq2SeqCache:
        """Empty decoder caches holding `batch` sequences (kwargs go to both, e.g. `dtype`)."""
        p = next(self.parameters())
        options = {
            "max_seqs": kwargs.pop("max_seqs", batch),
            "dtype": kwargs.pop("dtype", p.dtype),
            "device": kwargs.pop("device", p.device),
            **kwargs,
        }
        n = self.config.decoder_layers
        block = self.decoder[0]
        cache = Seq2SeqCache(
            block.attn.new_cache(n, **options), block.cross.new_cache(n, **options)
        )
        for _ in range(batch):
            cache.add_sequence()
        return cache

    def encode(self, src_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """The encoder output `(batch, src_len, hidden)`; rows past a source's end are unused."""
        _check_ids("src_ids", src_ids, self.config.vocab_size)
        lengths = source_lengths(src_mask, src_ids.shape)
        s = src_ids.shape[1]
        x = self.embed(src_ids)
        cos, sin = self.rope.cos_sin(torch.arange(s, device=src_ids.device), x.dtype)
        ragged = lengths is not None and bool((lengths < s).any())
        ctx = AttentionContext(cos, sin, padding(lengths) if ragged else None, None, False)
        for block in self.encoder:
            x = block(x, ctx)
        return self.encoder_norm(x)

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor | None = None,
        src_mask: Tensor | None = None,
        *,
        cache: Seq2SeqCache | None = None,
        seq_ids: list[int] | None = None,
    ) -> Tensor:
        """Logits `(batch, tgt_len, vocab)` for `tgt_ids` given the encoder output `memory`.

        Without a cache the targets start at position 0. With one they extend the cached
        sequences `seq_ids` (default: all, in order); `memory` is needed only until every
        cross-attention layer has stored its K/V (the request's first step).
        """
        _check_ids("tgt_ids", tgt_ids, self.config.vocab_size)
        b, t = tgt_ids.shape
        lengths = None
        if memory is not None:
            if memory.dim() != 3 or memory.shape[0] != b:
                raise ValueError(
                    f"memory must be (batch={b}, src_len, hidden), got {tuple(memory.shape)}"
                )
            lengths = source_lengths(src_mask, memory.shape[:2])
        cross_cache = None
        if cache is None:
            mask, positions = causal(), torch.arange(t, device=tgt_ids.device)
        else:
            seq_ids = cache.sequences if seq_ids is None else list(seq_ids)
            if len(seq_ids) != b:
                raise ValueError(
                    f"tgt_ids has batch {b} but seq_ids names {len(seq_ids)} sequences {seq_ids}"
                )
            cross_cache = cache.cross
            cross_cache.select(seq_ids)
            layers = range(self.config.decoder_layers)
            if memory is None and not all(cross_cache.holds(i) for i in layers):
                raise ValueError(
                    f"sequences {seq_ids} have no encoder K/V cached yet: pass memory= "
                    "(model.encode(src_ids, src_mask)) at their first decoding step"
                )
            step = cache.self_attn.prepare(seq_ids, t, token_ids=tgt_ids)
            mask, positions = step.mask, step.positions
        x = self.embed(tgt_ids)
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        ctx = AttentionContext(
            cos,
            sin,
            mask,
            None if cache is None else cache.self_attn,
            False,
            memory=memory,
            memory_lengths=lengths,
            cross_cache=cross_cache,
        )
        for block in self.decoder:
            x = block(x, ctx)
        return self.lm_head(self.decoder_norm(x))

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, src_mask: Tensor | None = None) -> Tensor:
        return self.decode(tgt_ids, self.encode(src_ids, src_mask), src_mask)

    @torch.no_grad()
    def generate(
        self,
        src_ids: Tensor,
        max_new_tokens: int,
        *,
        src_mask: Tensor | None = None,
        use_cache: bool = True,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Greedy decoding: `(batch, n <= max_new_tokens)` tokens after BOS, for each source.

        A sequence that emitted EOS continues with PAD until all have ended. `use_cache=False`
        re-runs the whole model on the tokens so far at every step (the uncached oracle).
        With `return_logits=True` also returns each step's logits `(batch, n, vocab)`.
        """
        check_positive_int("max_new_tokens", max_new_tokens)
        _check_ids("src_ids", src_ids, self.config.vocab_size)
        source_lengths(src_mask, src_ids.shape)
        cfg = self.config
        b = src_ids.shape[0]
        tokens = torch.full((b, 1), cfg.bos_token_id, dtype=torch.long, device=src_ids.device)
        done = torch.zeros(b, dtype=torch.bool, device=src_ids.device)
        if use_cache:
            memory, cache = self.encode(src_ids, src_mask), self.new_cache(b)
        steps = []
        for i in range(max_new_tokens):
            if use_cache:
                # Only the first step needs the encoder output; later ones read cached K/V.
                first = i == 0
                logits = self.decode(
                    tokens[:, -1:],
                    memory if first else None,
                    src_mask if first else None,
                    cache=cache,
                )[:, -1]
            else:
                logits = self(src_ids, tokens, src_mask)[:, -1]
            steps.append(logits)
            nxt = logits.argmax(-1)
            if cfg.eos_token_id is not None:
                nxt = nxt.masked_fill(done, cfg.pad_token_id)
                done = done | (nxt == cfg.eos_token_id)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        out = tokens[:, 1:]
        return (out, torch.stack(steps, dim=1)) if return_logits else out


def source_lengths(src_mask: Tensor | None, shape: tuple[int, ...] | torch.Size) -> Tensor | None:
    """Real tokens per row of a right-padded `src_mask` `(batch, src_len)`; None without one."""
    if src_mask is None:
        return None
    if not isinstance(src_mask, Tensor) or src_mask.dtype != torch.bool:
        got = src_mask.dtype if isinstance(src_mask, Tensor) else type(src_mask).__name__
        raise TypeError(f"src_mask must be a bool tensor (True on real tokens), got {got}")
    if tuple(src_mask.shape) != tuple(shape):
        raise ValueError(f"src_mask must have shape {tuple(shape)}, got {tuple(src_mask.shape)}")
    lengths = src_mask.sum(1)
    prefix = torch.arange(src_mask.shape[1], device=src_mask.device) < lengths[:, None]
    if not torch.equal(prefix, src_mask):
        raise ValueError(
            "src_mask must be right padding (each row True on its first tokens, then False), "
            f"got rows {src_mask.int().tolist()[:4]}"
        )
    return lengths


def _check_ids(name: str, ids: object, vocab_size: int) -> None:
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor of token ids, got {got}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must be (batch, seq) with seq >= 1, got {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} must be token ids in [0, {vocab_size}), got values in "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
