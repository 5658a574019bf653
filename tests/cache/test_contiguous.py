"""ContiguousCache: storage, growth, limits, fork/truncate/free, and bad use."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.cache import CacheFull, ContiguousCache


def fill(cache, seq, n, gen, layers=2):
    """Append n random tokens to `seq` in every layer; returns the K written per layer."""
    cache.prepare([seq], n)
    written = []
    for layer in range(layers):
        k = torch.randn(1, 2, n, 4, generator=gen, dtype=torch.float64)
        cache.update(layer, k, -k)
        written.append(k)
    return written


def stored(cache, seq, layer=0):
    slot = cache._slot[seq]
    return cache.k[layer, slot, :, : cache.length(seq)]


def test_fixed_capacity_fills_exactly_and_one_more_token_raises_without_change():
    gen = torch.Generator().manual_seed(0)
    cache = ContiguousCache(2, 2, 4, max_seqs=2, max_len=8, dtype=torch.float64)
    a, b = cache.add_sequence(), cache.add_sequence()
    fill(cache, a, 8, gen)  # exactly at the limit
    fill(cache, b, 3, gen)
    before = (stored(cache, a).clone(), stored(cache, b).clone(), cache.length(a))
    with pytest.raises(CacheFull, match="needs 9 positions but max_len is 8"):
        cache.prepare([b, a], 1)
    assert cache.length(a) == 8 and cache.length(b) == 3
    assert torch.equal(stored(cache, a), before[0]) and torch.equal(stored(cache, b), before[1])


def test_growth_keeps_the_data_and_nbytes_is_the_storage():
    gen = torch.Generator().manual_seed(1)
    cache = ContiguousCache(2, 2, 4, max_seqs=1, initial_len=2, dtype=torch.float64)
    seq = cache.add_sequence()
    first = fill(cache, seq, 2, gen)[0]
    fill(cache, seq, 5, gen)
    assert cache.capacity >= 7 and torch.equal(stored(cache, seq)[:, :2], first[0])
    assert cache.nbytes == (cache.k.numel() + cache.v.numel()) * 8


def test_fork_copies_and_the_copies_evolve_independently():
    gen = torch.Generator().manual_seed(2)
    cache = ContiguousCache(2, 2, 4, max_seqs=2, dtype=torch.float64)
    parent = cache.add_sequence()
    fill(cache, parent, 5, gen)
    child = cache.fork(parent)
    assert cache.length(child) == 5 and torch.equal(stored(cache, child), stored(cache, parent))
    snapshot = stored(cache, parent).clone()
    fill(cache, child, 3, gen)
    assert torch.equal(stored(cache, parent), snapshot)


def test_truncate_then_append_overwrites_the_rolled_back_tokens():
    gen = torch.Generator().manual_seed(3)
    cache = ContiguousCache(2, 2, 4, max_seqs=1, dtype=torch.float64)
    seq = cache.add_sequence()
    fill(cache, seq, 6, gen)
    cache.truncate(seq, 4)
    new = fill(cache, seq, 2, gen)[0]
    assert cache.length(seq) == 6 and torch.equal(stored(cache, seq)[:, 4:], new[0])


def test_freed_slots_are_reused_and_slots_run_out_with_cache_full():
    cache = ContiguousCache(1, 1, 4, max_seqs=2)
    a = cache.add_sequence()
    cache.add_sequence()
    with pytest.raises(CacheFull, match="all 2 sequence slots are in use"):
        cache.add_sequence()
    cache.free(a)
    assert cache.add_sequence() not in cache.sequences[:-1]


def test_views_of_a_gathered_batch_attend_like_each_sequence_alone():
    gen = torch.Generator().manual_seed(4)
    cache = ContiguousCache(1, 2, 4, max_seqs=3, dtype=torch.float64)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (5, 2, 7), strict=True):
        fill(cache, seq, n, gen, layers=1)
    step = cache.prepare([seqs[2], seqs[0]], 1)  # non-consecutive slots: gathered
    k_new = torch.randn(2, 2, 1, 4, generator=gen, dtype=torch.float64)
    k_view, v_view = cache.update(0, k_new, k_new)
    q = torch.randn(2, 4, 1, 4, generator=gen, dtype=torch.float64)
    out = attnkit.attention(q, k_view, v_view, step.mask)
    for row, seq in enumerate((seqs[2], seqs[0])):
        n = cache.length(seq)
        keys = stored(cache, seq).unsqueeze(0)
        values = cache.v[0, cache._slot[seq], :, :n].unsqueeze(0)
        alone = attnkit.attention(q[row : row + 1], keys, values, None)
        assert (out[row] - alone[0]).abs().max() < 1e-12


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda c, s: c.update(0, torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4)),
            RuntimeError,
            r"update\(\) before prepare\(\)",
        ),
        (lambda c, s: c.prepare([s], 0), ValueError, "n_new must be an integer >= 1, got 0"),
        (lambda c, s: c.prepare([s, s], 1), ValueError, "must not repeat a sequence"),
        (lambda c, s: c.prepare([], 1), ValueError, "at least one sequence"),
        (lambda c, s: c.prepare([99], 1), KeyError, "sequence 99 is not in this cache"),
        (lambda c, s: c.truncate(s, 1), ValueError, r"length must be an integer in \[0, 0\]"),
        (lambda c, s: (c.free(s), c.free(s)), KeyError, "is not in this cache"),
    ],
    ids=["update-first", "n_new-0", "repeat", "empty", "unknown", "truncate-past", "free-twice"],
)
def test_bad_use_raises_clear_errors(call, error, message):
    cache = ContiguousCache(1, 2, 4, max_seqs=2)
    seq = cache.add_sequence()
    with pytest.raises(error, match=message):
        call(cache, seq)


def test_update_with_the_wrong_shape_names_the_expected_one():
    cache = ContiguousCache(1, 2, 4)
    seq = cache.add_sequence()
    cache.prepare([seq], 3)
    with pytest.raises(ValueError, match=r"k must be \(batch=1, kv_heads, n_new=3, head_dim\)"):
        cache.update(0, torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4))


@pytest.mark.parametrize("arg", ["n_layers", "kv_heads", "head_dim", "max_seqs", "max_len"])
def test_constructor_arguments_must_be_positive(arg):
    kwargs = dict(n_layers=1, kv_heads=1, head_dim=4)
    kwargs[arg] = 0
    with pytest.raises(ValueError, match=f"{arg} must be an integer >= 1, got 0"):
        ContiguousCache(**kwargs)


def test_batched_writes_land_at_each_sequence_s_own_length():
    # Equal lengths in consecutive slots are written as one block copy, ragged lengths and
    # scattered slots through an index: both must put every token where its sequence ends.
    gen = torch.Generator().manual_seed(5)
    cache = ContiguousCache(2, 2, 4, max_seqs=4, dtype=torch.float64)
    seqs = [cache.add_sequence() for _ in range(4)]
    written = {s: [[], []] for s in seqs}
    for batch, n in (
        (seqs, 3),  # all empty: one block
        (seqs[:2], 2),  # ragged from here on
        (seqs, 1),
        ([seqs[3], seqs[1]], 2),  # out of slot order
        (seqs[2:], 4),  # equal again
    ):
        cache.prepare(batch, n)
        for layer in range(2):
            k = torch.randn(len(batch), 2, n, 4, generator=gen, dtype=torch.float64)
            cache.update(layer, k, -k)
            for row, seq in enumerate(batch):
                written[seq][layer].append(k[row])
    for seq in seqs:
        for layer in range(2):
            want = torch.cat(written[seq][layer], dim=1)
            assert torch.equal(stored(cache, seq, layer), want)
            assert torch.equal(cache.v[layer, cache._slot[seq], :, : cache.length(seq)], -want)


def test_a_ragged_decode_step_is_key_padding_with_each_sequence_s_length():
    from attnkit.ops.masks import padding_lengths

    cache = ContiguousCache(1, 2, 4, max_seqs=3, dtype=torch.float64)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (4, 1, 6), strict=True):
        cache.prepare([seq], n)
    step = cache.prepare(seqs, 1)
    assert padding_lengths(step.mask).tolist() == [5, 2, 7]
    keys = torch.arange(step.kv_len)
    want = keys <= torch.tensor([4, 1, 6]).view(-1, 1)  # each sees itself and its past
    assert torch.equal(step.mask.dense(1, step.kv_len)[:, 0, 0], want)


@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
@torch.no_grad()
def test_decode_attend_takes_the_kernel_and_equals_attention(ragged, monkeypatch):
    """A decode step's `attend` calls the C++ decode kernel directly (no `attention`
    dispatch) and gives what `update` + `layer_mask` + `attention` give, float32 2e-6."""
    from attnkit.ops import cpu_decode

    gen = torch.Generator().manual_seed(41)
    lengths = [5, 12, 9] if ragged else [7, 7, 7]
    cache = ContiguousCache(2, 3, 16, max_seqs=3, initial_len=4)
    seqs = [cache.add_sequence() for _ in lengths]
    for seq, n in zip(seqs, lengths, strict=True):
        cache.prepare([seq], n)
        for layer in range(2):
            kv = torch.randn(1, 3, n, 16, generator=gen)
            cache.update(layer, kv, kv * 0.5)
    import attnkit.cache.contiguous as contiguous_module

    calls = []
    real = cpu_decode.decode_contiguous
    monkeypatch.setattr(
        cpu_decode, "decode_contiguous", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )

    def no_dispatch(*args, **kwargs):
        raise AssertionError("the decode step went through attention()")

    monkeypatch.setattr(contiguous_module, "attention", no_dispatch)
    cache.prepare(seqs, 1)
    q, k, v = (torch.randn(3, 9, 1, 16, generator=gen) for _ in range(3))
    k, v = k[:, :3], v[:, :3]
    got = cache.attend(1, q, k, v, None)
    assert calls == [1]
    k_all, v_all = cache.update(1, k, v)  # the same write again: same views
    mask = cache.layer_mask(1)
    assert torch.equal(got, attnkit.attention(q, k_all, v_all, mask))  # auto: the same kernel
    want = attnkit.attention(q, k_all, v_all, mask, backend="reference")
    assert (got - want).abs().max() < 2e-6
