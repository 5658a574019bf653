"""Byte predictors for attnkit's own caches: each reproduces a cache's `nbytes` exactly.

Tests fill real caches (contiguous, paged, sliding-window, quantized, latent) and compare.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attnkit.tools.memory import KVSpec, _bytes, dtype_bits


def _plain_values(spec: KVSpec) -> int:
    if spec.is_mla:
        raise ValueError(f"{spec.name}: attnkit's K/V caches store per-head K/V, not MLA latents")
    return spec.head_dim + (spec.v_head_dim or spec.head_dim)


def contiguous_capacity(
    tokens: int, max_len: int | None = None, initial_len: int = 256, step: int | None = None
) -> int:
    """`ContiguousCache.capacity` after its longest sequence reached `tokens` in `step`s.

    Without `max_len`, a step needing more than the capacity grows it to
    `max(needed, 2 * capacity)`; `step=None` means all tokens in one prefill.
    """
    if max_len is not None:
        return max_len
    capacity, length = initial_len, 0
    while length < tokens:
        length = min(tokens, length + (step or tokens))
        if length > capacity:
            capacity = max(length, 2 * capacity)
    return capacity


def contiguous_cache_bytes(
    spec: KVSpec,
    *,
    max_seqs: int = 1,
    max_len: int | None = None,
    initial_len: int = 256,
    tokens: int = 0,
    step: int | None = None,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`ContiguousCache.nbytes`: K and V buffers preallocated for `max_seqs` x capacity."""
    capacity = contiguous_capacity(tokens, max_len, initial_len, step)
    values = spec.layers * max_seqs * spec.kv_heads * capacity * _plain_values(spec)
    return _bytes(values * dtype_bits(dtype))


def latent_cache_bytes(
    spec: KVSpec,
    *,
    max_seqs: int = 1,
    max_len: int | None = None,
    initial_len: int = 256,
    tokens: int = 0,
    step: int | None = None,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`LatentCache.nbytes`: MLA latent + RoPE key buffers for `max_seqs` x capacity.

    `spec.rope_dim` counts every RoPE key head (`rope_heads * rope_dim` of the layer).
    """
    if not spec.is_mla:
        raise ValueError(f"{spec.name}: latent_cache_bytes needs an MLA spec (kv_rank, rope_dim)")
    capacity = contiguous_capacity(tokens, max_len, initial_len, step)
    values = spec.layers * max_seqs * capacity * spec.values_per_token_layer
    return _bytes(values * dtype_bits(dtype))


def paged_pool_bytes(
    spec: KVSpec, *, num_blocks: int, block_size: int = 16, dtype: str | torch.dtype = torch.float32
) -> int:
    """`PagedCache.nbytes`: the whole block pool, every layer, K and V."""
    values = spec.layers * num_blocks * block_size * spec.kv_heads * _plain_values(spec)
    return _bytes(values * dtype_bits(dtype))


def paged_cache_bytes(
    spec: KVSpec,
    tokens: int | Sequence[int],
    *,
    block_size: int = 16,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`PagedCache.used_nbytes` for unshared sequences of these lengths: whole blocks each."""
    lengths = [tokens] if isinstance(tokens, int) else list(tokens)
    blocks = sum(-(-n // block_size) for n in lengths)
    return paged_pool_bytes(spec, num_blocks=blocks, block_size=block_size, dtype=dtype)


def window_cache_bytes(
    spec: KVSpec,
    *,
    window: int,
    sinks: int = 0,
    max_seqs: int = 1,
    max_new_per_step: int = 512,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`SlidingWindowCache.nbytes`: sinks + a ring of `window - 1 + max_new_per_step` slots.

    Plus its int64 table of the position held by each slot; independent of length.
    """
    capacity = sinks + window - 1 + max_new_per_step
    kv = contiguous_cache_bytes(spec, max_seqs=max_seqs, max_len=capacity, dtype=dtype)
    return kv + max_seqs * capacity * 8


def quantized_cache_bytes(
    spec: KVSpec,
    *,
    max_seqs: int = 1,
    max_len: int | None = None,
    initial_len: int = 256,
    tokens: int = 0,
    step: int | None = None,
    scale_dtype: str | torch.dtype = torch.float32,
) -> int:
    """`QuantizedCache.nbytes`: int8 K/V plus one scale per (token, KV head) for K and V."""
    capacity = contiguous_capacity(tokens, max_len, initial_len, step)
    data = contiguous_cache_bytes(spec, max_seqs=max_seqs, max_len=capacity, dtype="int8")
    scales = 2 * spec.layers * max_seqs * spec.kv_heads * capacity * dtype_bits(scale_dtype)
    return data + _bytes(scales)


def h2o_cache_bytes(
    spec: KVSpec,
    *,
    budget: int,
    max_seqs: int = 1,
    max_new_per_step: int = 512,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`H2OCache.nbytes`: K/V for `budget + max_new_per_step` slots per layer and sequence,
    plus each slot's position (int64) and accumulated attention mass (at least float32)."""
    capacity = budget + max_new_per_step
    kv = contiguous_cache_bytes(spec, max_seqs=max_seqs, max_len=capacity, dtype=dtype)
    mass_bits = max(dtype_bits(dtype), 32)
    return kv + _bytes(spec.layers * max_seqs * capacity * (64 + mass_bits))
