"""The KV strategies `attnkit compare` measures, and the names that select them.

A strategy is two choices: the model (as shipped, or converted: MHA, fewer KV heads, MLA,
another RoPE scaling) and the cache its tokens go through (full K/V, a window, sinks, heavy
hitters, int8). Each also predicts its cache's `nbytes` with `tools.cache_memory`, so the
report can cross-check the real allocation against `attnkit memory`'s arithmetic.

Names (`--strategies`): shipped, mha, mqa, gqa:N, mla:R, window:W, sinks:W, h2o:B, int8,
rope:none|linear|dynamic|yarn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.cache import H2OCache, KVCache, QuantizedCache, SlidingWindowCache, StreamingLLMCache
from attnkit.layers.rope import DynamicNTKScaling, LinearScaling, RopeScaling, YarnScaling
from attnkit.models.convert.heads import expand_to_mha, pool_kv_heads
from attnkit.models.convert.mla import to_mla
from attnkit.models.convert.rope import with_rope_scaling
from attnkit.models.llama import Transformer
from attnkit.tools import cache_memory
from attnkit.tools.memory import KVSpec

SINKS = 4  # StreamingLLM keeps 4 initial tokens
# RoPE dims MLA conversions keep rotary (of SmolLM2's 192): removing rotation costs more
# than compressing the latent (measured; see models/convert/mla.py).
MLA_ROPE_DIM = 96
ROPE_KINDS = ("none", "linear", "dynamic", "yarn")
GRAMMAR = "shipped | mha | mqa | gqa:N | mla:R | window:W | sinks:W | h2o:B | int8 | rope:KIND"

ModelBuilder = Callable[[Transformer, Tensor], Transformer]  # (shipped model, calibration ids)
# (model, max tokens or None to grow as tokens arrive, tokens per step)
CacheBuilder = Callable[[Transformer, int | None, int], KVCache]
# (model, tokens, step tokens): nbytes after `tokens` tokens in `step`s through a growing cache
BytesPredictor = Callable[[Transformer, int, int], int]


@dataclass(frozen=True)
class Strategy:
    """One row of the comparison: how to build its model and its cache."""

    name: str  # as selected on the command line, e.g. "window:256"
    label: str  # for people, e.g. "sliding window 256"
    family: str
    build_model: ModelBuilder | None  # None: the shipped model itself
    new_cache: CacheBuilder
    predict_nbytes: BytesPredictor
    extends_context: bool = False  # evaluated past the training length (RoPE scalings)

    def model(self, shipped: Transformer, calibration: Tensor) -> Transformer:
        return shipped if self.build_model is None else self.build_model(shipped, calibration)


def kv_spec(model: Transformer) -> KVSpec:
    """What one token costs in `model`'s cache, as `attnkit memory` describes it."""
    c = model.config
    attn = model.blocks[0].attn
    if hasattr(attn, "kv_rank"):  # MLA: a latent plus the RoPE key(s)
        return KVSpec(
            "model",
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            kv_rank=attn.kv_rank,
            rope_dim=attn.rope_dim * attn.rope_heads,
        )
    return KVSpec(
        "model", c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    )


def _dtype(model: Transformer) -> torch.dtype:
    return next(model.parameters()).dtype


def _full_cache(model: Transformer, tokens: int | None, step: int) -> KVCache:
    return model.new_cache(1, max_len=tokens)


def _full_bytes(model: Transformer, tokens: int, step: int) -> int:
    spec, dtype = kv_spec(model), _dtype(model)
    predict = (
        cache_memory.latent_cache_bytes if spec.is_mla else cache_memory.contiguous_cache_bytes
    )
    return predict(spec, tokens=tokens, step=step, dtype=dtype)


def _shape(model: Transformer) -> tuple[int, int, int]:
    c = model.config
    return c.num_hidden_layers, c.num_key_value_heads, c.head_dim


def full_attention(name, label, family, build=None, extends=False) -> Strategy:
    return Strategy(name, label, family, build, _full_cache, _full_bytes, extends)


def _window_bytes(size: int, sinks: int) -> BytesPredictor:
    def predict(model, tokens, step):
        return cache_memory.window_cache_bytes(
            kv_spec(model), window=size, sinks=sinks, max_new_per_step=step, dtype=_dtype(model)
        )

    return predict


def window(size: int) -> Strategy:
    """A ring buffer of the last `size` tokens, nothing else."""

    def new_cache(model, tokens, step):
        cache = SlidingWindowCache(
            *_shape(model), window=size, max_new_per_step=step, dtype=_dtype(model)
        )
        cache.add_sequence()
        return cache

    label = f"sliding window {size}"
    return Strategy(f"window:{size}", label, "window", None, new_cache, _window_bytes(size, 0))


def streaming_llm(budget: int) -> Strategy:
    """StreamingLLM: 4 sink tokens plus the most recent ones, `budget` tokens in all."""

    def new_cache(model, tokens, step):
        cache = StreamingLLMCache(
            *_shape(model), budget=budget, sinks=SINKS, max_new_per_step=step, dtype=_dtype(model)
        )
        cache.add_sequence()
        return cache

    label = f"window {budget - SINKS} + {SINKS} sinks"
    # StreamingLLMCache is a window of budget - sinks + 1 (the new token) beside the sinks.
    predict = _window_bytes(budget - SINKS + 1, SINKS)
    return Strategy(f"sinks:{budget}", label, "window + sinks", None, new_cache, predict)


def h2o(budget: int) -> Strategy:
    """H2O: half the budget for recent tokens, half for heavy hitters (as in the paper)."""
    recent = budget // 2

    def new_cache(model, tokens, step):
        cache = H2OCache(
            *_shape(model), budget=budget, recent=recent, max_new_per_step=step, dtype=_dtype(model)
        )
        cache.add_sequence()
        return cache

    def predict(model, tokens, step):
        return cache_memory.h2o_cache_bytes(
            kv_spec(model), budget=budget, max_new_per_step=step, dtype=_dtype(model)
        )

    return Strategy(f"h2o:{budget}", f"H2O {budget}", "eviction", None, new_cache, predict)


def int8() -> Strategy:
    def new_cache(model, tokens, step):
        cache = QuantizedCache(*_shape(model), max_len=tokens, dtype=_dtype(model))
        cache.add_sequence()
        return cache

    def predict(model, tokens, step):
        return cache_memory.quantized_cache_bytes(kv_spec(model), tokens=tokens, step=step)

    return Strategy("int8", "int8 K/V", "quantized", None, new_cache, predict)


def rope_scaling(kind: str, factor: float, original: int) -> RopeScaling:
    """The scaling a `rope:KIND` row uses to stretch `original` positions by `factor`."""
    if kind == "linear":
        return LinearScaling(factor=factor)
    if kind == "dynamic":
        return DynamicNTKScaling(factor=factor, original_max_position_embeddings=original)
    if kind == "yarn":
        return YarnScaling(factor=factor, original_max_position_embeddings=original)
    return RopeScaling()


def parse(name: str, *, extension_factor: float = 2.0) -> Strategy:
    """The strategy a `--strategies` entry names; ValueError lists the grammar."""
    head, _, arg = name.strip().partition(":")
    fixed = {
        "shipped": lambda: full_attention("shipped", "as shipped (GQA)", "as shipped"),
        "mha": lambda: full_attention(
            "mha", "MHA-expanded (control)", "more KV heads", lambda m, c: expand_to_mha(m)
        ),
        "mqa": lambda: full_attention(
            "mqa", "MQA (mean-pooled)", "fewer KV heads", lambda m, c: pool_kv_heads(m, 1)
        ),
        "int8": int8,
    }
    if head in fixed and not arg:
        return fixed[head]()
    if head == "rope" and arg in ROPE_KINDS:

        def build(model, calibration, kind=arg):
            original = model.config.max_position_embeddings
            return with_rope_scaling(model, rope_scaling(kind, extension_factor, original))

        return full_attention(f"rope:{arg}", f"RoPE {arg}", "context extension", build, True)
    sized = {"gqa", "mla", "window", "sinks", "h2o"}
    if head in sized and arg.isdigit() and int(arg) > 0:
        n = int(arg)
        if head == "gqa":
            build = lambda m, c: pool_kv_heads(m, n)  # noqa: E731
            return full_attention(name, f"GQA {n} KV heads (pooled)", "fewer KV heads", build)
        if head == "mla":
            build = lambda m, c: to_mla(m, n, rope_dim=MLA_ROPE_DIM, calibration=c)  # noqa: E731
            return full_attention(name, f"MLA rank {n} + RoPE {MLA_ROPE_DIM}", "MLA", build)
        if head == "window":
            return window(n)
        if head == "sinks":
            if n <= SINKS:
                raise ValueError(f"sinks:{n} must keep more than the {SINKS} sink tokens")
            return streaming_llm(n)
        return h2o(n)
    raise ValueError(f"unknown strategy {name!r}; allowed: {GRAMMAR}")
