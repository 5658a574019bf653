"""Changing how many K/V heads a loaded model has: mean-pooling to GQA/MQA, expanding to MHA.

Pooling follows Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models
from Multi-Head Checkpoints" (2023): the K and V projections of the heads merged into one
group are averaged. It is lossy (the paper uptrains afterwards); the perplexity evaluator
(`attnkit.tools.perplexity`) measures the loss. Expansion to MHA repeats each K/V head for
every query head of its group, so it changes memory, never the logits.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn

from attnkit._checks import check_positive_int
from attnkit.layers.attention import Attention
from attnkit.layers.projection import Linear
from attnkit.models.llama import Transformer


def _attention_layers(model: Transformer) -> list[Attention]:
    """The model's attention layers, checked to be K/V-head `Attention` layers as configured."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be an attnkit Transformer, got {type(model).__name__}")
    layers = [block.attn for block in model.blocks]
    for i, attn in enumerate(layers):
        if not isinstance(attn, Attention):
            raise TypeError(
                f"layer {i} attention is {type(attn).__name__}; K/V-head conversions need "
                f"attnkit.layers.attention.Attention layers (K/V projections per head)"
            )
        if attn.n_kv_heads != model.config.num_key_value_heads:
            raise ValueError(
                f"layer {i} has {attn.n_kv_heads} K/V heads but the config says "
                f"num_key_value_heads={model.config.num_key_value_heads}"
            )
    return layers


def _regroup(linear: nn.Linear, head_dim: int, fn) -> nn.Linear:
    """A new Linear whose output heads are `fn((heads, head_dim, ...))` of `linear`'s."""
    weight = fn(linear.weight.detach().unflatten(0, (-1, head_dim))).flatten(0, 1)
    bias = None
    if linear.bias is not None:
        bias = fn(linear.bias.detach().unflatten(0, (-1, head_dim))).flatten(0, 1)
    out = Linear(
        linear.in_features,
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _with_kv_heads(model: Transformer, n_kv_heads: int, fn) -> Transformer:
    """A deep copy of `model` with every layer's wk/wv regrouped by `fn` to `n_kv_heads`."""
    new = copy.deepcopy(model)
    for attn in _attention_layers(new):
        attn.wk = _regroup(attn.wk, attn.head_dim, fn)
        attn.wv = _regroup(attn.wv, attn.head_dim, fn)
        attn.n_kv_heads = n_kv_heads
    new.config = dataclasses.replace(new.config, num_key_value_heads=n_kv_heads)
    return new


def pool_kv_heads(model: Transformer, n_kv_heads: int) -> Transformer:
    """A copy of `model` with `n_kv_heads` K/V heads, each the mean of the heads it merges.

    Query head i uses K/V head i // (n_heads / n_kv_heads), so new K/V head j serves the
    query heads of old K/V heads j·r .. j·r + r - 1 (r = old / new) and is their mean: each
    new group is a union of old groups, which needs `n_kv_heads` to divide the current
    number. `n_kv_heads=1` gives MQA; the current number returns an exact copy.
    """
    _attention_layers(model)
    current = model.config.num_key_value_heads
    check_positive_int("n_kv_heads", n_kv_heads)
    if n_kv_heads > current or current % n_kv_heads:
        allowed = [d for d in range(1, current + 1) if current % d == 0]
        raise ValueError(
            f"n_kv_heads must divide the current number of K/V heads ({current}) so that each "
            f"new group merges whole old groups; got {n_kv_heads}, allowed: {allowed}"
            + ("; use expand_to_mha for more heads" if n_kv_heads > current else "")
        )
    merged = current // n_kv_heads

    def mean_pool(heads: Tensor) -> Tensor:
        # (old heads, d, ...) -> (new heads, merged, d, ...) -> mean over the merged heads
        grouped = heads.unflatten(0, (n_kv_heads, merged))
        return grouped.double().mean(1).to(heads.dtype)

    return _with_kv_heads(model, n_kv_heads, mean_pool)


def expand_to_mha(model: Transformer) -> Transformer:
    """A copy of `model` with one K/V head per query head (each K/V head repeated).

    Query head i of a GQA model reads K/V head i // group; repeating each K/V head `group`
    times in place (`repeat_interleave`) gives query head i its own copy of that head, so
    attention, and the logits, are unchanged while the cache grows `group` times.
    """
    _attention_layers(model)
    n_heads = model.config.num_attention_heads
    group = n_heads // model.config.num_key_value_heads
    return _with_kv_heads(model, n_heads, lambda heads: heads.repeat_interleave(group, dim=0))


def kv_bytes_per_token(model: Transformer, dtype: torch.dtype | None = None) -> int:
    """Bytes of K and V that `model` caches per token over all layers (default: its dtype)."""
    layers = _attention_layers(model)
    if dtype is None:
        dtype = next(model.parameters()).dtype
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    return sum(2 * attn.n_kv_heads * attn.head_dim * dtype.itemsize for attn in layers)
