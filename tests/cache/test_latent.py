"""LatentCache: what it stores, its size formula, and the protocol it inherits."""

from __future__ import annotations

import pytest
import torch

from attnkit.cache import CacheFull
from attnkit.cache.latent import LatentCache


def fill(cache, seq, n, gen):
    """Append n random tokens to `seq` in every layer; per layer, what was written and the views."""
    cache.prepare([seq], n)
    out = []
    for layer in range(cache.n_layers):
        latent = torch.randn(1, n, cache.kv_rank, generator=gen, dtype=torch.float64)
        key = torch.randn(
            1, cache.rope_heads, n, cache.rope_dim, generator=gen, dtype=torch.float64
        )
        out.append(((latent, key), cache.update(layer, latent, key)))
    return out


def stored(cache, seq, layer=0):
    """(latents (n, kv_rank), RoPE keys (rope_heads, n, rope_dim)) held for `seq`, copied."""
    slot, n = cache._slot[seq], cache.length(seq)
    keys = cache.v[layer, slot, 0, :n].view(n, cache.rope_heads, cache.rope_dim)
    return cache.k[layer, slot, 0, :n].clone(), keys.transpose(0, 1).clone()


@pytest.mark.parametrize(("kv_rank", "rope_dim", "rope_heads"), [(7, 4, 1), (23, 6, 3)])
def test_views_return_exactly_what_was_written_in_order(kv_rank, rope_dim, rope_heads):
    gen = torch.Generator().manual_seed(0)
    cache = LatentCache(2, kv_rank, rope_dim, rope_heads=rope_heads, dtype=torch.float64)
    seq = cache.add_sequence()
    first, second = fill(cache, seq, 5, gen), fill(cache, seq, 4, gen)
    for layer in range(2):
        (latent_a, key_a), _ = first[layer]
        (latent_b, key_b), (latents, keys) = second[layer]
        assert latents.shape == (1, 9, kv_rank) and keys.shape == (1, rope_heads, 9, rope_dim)
        assert torch.equal(latents, torch.cat([latent_a, latent_b], dim=1))
        assert torch.equal(keys, torch.cat([key_a, key_b], dim=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_per_token_is_kv_rank_plus_rope_heads_times_rope_dim(dtype):
    gen = torch.Generator().manual_seed(1)
    layers, kv_rank, rope_dim, rope_heads = 3, 19, 6, 3
    cache = LatentCache(
        layers, kv_rank, rope_dim, rope_heads=rope_heads, max_seqs=2, initial_len=4, dtype=dtype
    )
    size = torch.empty((), dtype=dtype).element_size()
    per_token = layers * (kv_rank + rope_heads * rope_dim) * size
    assert cache.values_per_token == kv_rank + rope_heads * rope_dim
    a, b = cache.add_sequence(), cache.add_sequence()
    for n in (3, 2, 9):  # 4 slots, then 5 -> 8, then 14 -> 16: doubling growth
        cache.prepare([a, b], n)
        for layer in range(layers):
            latent = torch.randn(2, n, kv_rank, generator=gen).to(dtype)
            cache.update(layer, latent, torch.zeros(2, rope_heads, n, rope_dim, dtype=dtype))
        assert cache.nbytes == 2 * cache.capacity * per_token  # 2 slots preallocated
    assert cache.capacity == 16


def test_fixed_capacity_fills_exactly_and_one_more_token_raises():
    gen = torch.Generator().manual_seed(2)
    cache = LatentCache(1, 5, 2, max_len=6, dtype=torch.float64)
    seq = cache.add_sequence()
    fill(cache, seq, 6, gen)  # exactly at the limit
    with pytest.raises(CacheFull, match="needs 7 positions but max_len is 6"):
        cache.prepare([seq], 1)
    assert cache.length(seq) == 6


def test_fork_copies_and_truncate_rolls_back():
    gen = torch.Generator().manual_seed(3)
    cache = LatentCache(2, 8, 4, rope_heads=3, max_seqs=2, dtype=torch.float64)
    parent = cache.add_sequence()
    fill(cache, parent, 6, gen)
    child = cache.fork(parent)
    before = stored(cache, parent, layer=1)
    assert all(torch.equal(a, b) for a, b in zip(stored(cache, child, 1), before, strict=True))
    fill(cache, child, 3, gen)
    assert all(torch.equal(a, b) for a, b in zip(stored(cache, parent, 1), before, strict=True))
    cache.truncate(child, 4)
    (latent, key), _ = fill(cache, child, 2, gen)[1]
    latents, keys = stored(cache, child, layer=1)
    assert cache.length(child) == 6 and torch.equal(latents[:4], before[0][:4])
    assert torch.equal(latents[4:], latent[0]) and torch.equal(keys[:, 4:], key[0])


def test_gathered_slots_return_each_sequence():
    gen = torch.Generator().manual_seed(4)
    cache = LatentCache(1, 5, 2, rope_heads=3, max_seqs=3, dtype=torch.float64)
    seqs = [cache.add_sequence() for _ in range(3)]
    written = {s: fill(cache, s, n, gen)[0][0] for s, n in zip(seqs, (4, 2, 3), strict=True)}
    step = cache.prepare([seqs[2], seqs[0]], 1)  # non-consecutive slots: gathered copies
    new = torch.zeros(2, 1, 5, dtype=torch.float64), torch.zeros(2, 3, 1, 2, dtype=torch.float64)
    latents, keys = cache.update(0, *new)
    assert latents.shape == (2, 5, 5) and keys.shape == (2, 3, 5, 2) and step.mask is not None
    assert torch.equal(latents[0, :3], written[seqs[2]][0][0])
    assert torch.equal(keys[1, :, :4], written[seqs[0]][1][0])


@pytest.mark.parametrize(
    ("latent", "key", "message"),
    [
        ((1, 3, 5), (1, 1, 2, 2), r"rope_key must have shape \(1, 1, 3, 2\)"),
        ((1, 3, 4), (1, 1, 3, 2), r"latent must have shape \(1, 3, 5\)"),
        ((1, 1, 3, 5), (1, 1, 3, 2), r"latent must have shape \(1, 3, 5\).*got \(1, 1, 3, 5\)"),
    ],
)
def test_update_with_wrong_shapes_names_the_tensor_and_expected_shape(latent, key, message):
    cache = LatentCache(1, 5, 2)
    cache.prepare([cache.add_sequence()], 3)
    with pytest.raises(ValueError, match=message):
        cache.update(0, torch.zeros(latent), torch.zeros(key))


def test_update_before_prepare_and_bad_constructor_arguments():
    cache = LatentCache(1, 5, 2)
    cache.add_sequence()
    with pytest.raises(RuntimeError, match=r"update\(\) before prepare\(\)"):
        cache.update(0, torch.zeros(1, 1, 5), torch.zeros(1, 1, 1, 2))
    for arg in ("kv_rank", "rope_dim", "rope_heads"):
        with pytest.raises(ValueError, match=f"{arg} must be an integer >= 1, got 0"):
            LatentCache(**(dict(n_layers=1, kv_rank=5, rope_dim=2) | {arg: 0}))
