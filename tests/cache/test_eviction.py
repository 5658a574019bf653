"""Token-budget caches: StreamingLLM (sinks + recent) and H2O (recent + heavy hitters)."""

from __future__ import annotations

import math

import pytest
import torch
from test_window import decode_model

import attnkit
from attnkit.cache.eviction import H2OCache, StreamingLLMCache
from attnkit.masks import causal, sinks, sliding_window
from models.test_llama import tiny

HEADS, KV_HEADS, DIM = 4, 2, 8


def history(gen, batch, n, layers=1):
    """Random (q, k, v) per layer for `n` positions of `batch` sequences (float64)."""

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return [
        (draw(batch, HEADS, n, DIM), draw(batch, KV_HEADS, n, DIM), draw(batch, KV_HEADS, n, DIM))
        for _ in range(layers)
    ]


def step(cache, seqs, layers, n):
    """The next `n` tokens of each sequence in `seqs` (rows of `layers` by sequence id),
    through every layer as a model drives the cache; the outputs per layer."""
    st = cache.prepare(seqs, n)

    def take(t):  # each row from its own position
        return torch.stack(
            [t[s, :, p : p + n] for s, p in zip(seqs, st.start.tolist(), strict=True)]
        )

    outs = []
    for layer, (q, k, v) in enumerate(layers):
        if cache.wants_queries:
            cache.record_queries(layer, take(q))
        k_view, v_view = cache.update(layer, take(k), take(v))
        outs.append(attnkit.attention(take(q), k_view, v_view, st.mask))
    return outs


def run(cache, seqs, layers, chunks):
    """Decode `chunks` for all `seqs` together; outputs per layer, concatenated."""
    per_step = [step(cache, seqs, layers, n) for n in chunks]
    return [torch.cat(outs, dim=2) for outs in zip(*per_step, strict=True)]


def new_h2o(budget, recent, max_seqs=1, max_new=8, n_layers=1):
    return H2OCache(
        n_layers,
        KV_HEADS,
        DIM,
        budget=budget,
        recent=recent,
        max_seqs=max_seqs,
        max_new_per_step=max_new,
        dtype=torch.float64,
    )


def h2o_oracle(q, k, v, chunks, budget, recent):
    """H2O for one sequence and layer, by brute force over Python lists of positions.

    q `(heads, T, d)`, k/v `(kv_heads, T, d)`. Returns the outputs and, after each step,
    the kept positions: the `recent` newest plus the `budget - recent` older ones with the
    largest attention mass (softmax weight summed over heads and over all queries so far).
    """
    group = q.shape[0] // k.shape[0]
    kept, mass, outs, kept_after, start = [], {}, [], [], 0
    for n in chunks:
        keys = kept + list(range(start, start + n))
        allowed = torch.tensor([[p <= start + i for p in keys] for i in range(n)])
        keys_k = k[:, keys].repeat_interleave(group, 0)
        scores = q[:, start : start + n] @ keys_k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        weights = scores.masked_fill(~allowed, -math.inf).softmax(-1)  # (heads, n, keys)
        outs.append(weights @ v[:, keys].repeat_interleave(group, 0))
        for j, p in enumerate(keys):
            mass[p] = mass.get(p, 0.0) + weights[:, :, j].sum().item()
        if len(keys) > budget:
            older, newest = keys[: len(keys) - recent], keys[len(keys) - recent :]
            heavy = sorted(older, key=mass.__getitem__, reverse=True)[: budget - recent]
            keys = sorted(heavy) + newest
        kept, start = keys, start + n
        kept_after.append(list(kept))
    return torch.cat(outs, dim=1), kept_after


@pytest.mark.parametrize(("budget", "n_sinks"), [(6, 2), (5, 0), (3, 3)])
@pytest.mark.parametrize("chunks", [[1] * 25, [7, 1, 1, 8, 8]], ids=["tokens", "chunks"])
def test_streaming_llm_equals_window_plus_sinks_attention(budget, n_sinks, chunks):
    gen = torch.Generator().manual_seed(budget)
    layers = history(gen, 2, 25)
    cache = StreamingLLMCache(
        1,
        KV_HEADS,
        DIM,
        budget=budget,
        sinks=n_sinks,
        max_seqs=2,
        max_new_per_step=8,
        dtype=torch.float64,
    )
    seqs = [cache.add_sequence(), cache.add_sequence()]
    (got,) = run(cache, seqs, layers, chunks)
    q, k, v = layers[0]
    # A new token sees the `budget` kept tokens and itself.
    mask = sliding_window(budget - n_sinks + 1) | sinks(n_sinks)
    assert (got - attnkit.attention(q, k, v, mask, backend="reference")).abs().max() < 1e-12
    kept = cache.kept_positions(seqs[1]).tolist()
    assert kept == [*range(n_sinks), *range(25 - (budget - n_sinks), 25)]
    assert cache.capacity == budget + 8


@pytest.mark.parametrize("chunks", [[10, 4, 6], [1] * 20], ids=str)
def test_h2o_with_a_budget_of_the_whole_length_is_full_attention(chunks):
    gen = torch.Generator().manual_seed(1)
    layers = history(gen, 1, 20, layers=2)
    cache = new_h2o(budget=20, recent=3, max_new=10, n_layers=2)  # exactly at the limit
    seq = cache.add_sequence()
    got = run(cache, [seq], layers, chunks)
    for out, (q, k, v) in zip(got, layers, strict=True):
        assert (out - attnkit.attention(q, k, v, causal(), backend="reference")).abs().max() < 1e-12
    assert cache.kept_positions(seq, 1).tolist() == list(range(20))
    one_less = new_h2o(budget=19, recent=3, max_new=10, n_layers=2)  # one past: evicts
    run(one_less, [one_less.add_sequence()], layers, chunks)
    assert len(one_less.kept_positions(0, 0)) == 19


@pytest.mark.parametrize(
    ("budget", "recent", "chunks"),
    [(8, 3, [1] * 24), (8, 3, [6, 1, 4, 1, 1, 6, 5]), (5, 0, [3, 1, 1, 7, 2]), (6, 6, [2, 5, 9])],
    ids=["tokens", "chunks", "no-recent", "all-recent"],
)
def test_h2o_keeps_the_recent_tokens_and_the_top_mass_ones_as_brute_force_does(
    budget, recent, chunks
):
    gen = torch.Generator().manual_seed(budget * 10 + recent)
    total = sum(chunks)
    layers = history(gen, 2, total + 7, layers=2)
    cache = new_h2o(budget, recent, max_seqs=2, max_new=9, n_layers=2)
    a, b = cache.add_sequence(), cache.add_sequence()
    first = run(cache, [a], layers, [7])  # sequence a starts 7 tokens ahead: a ragged batch
    together = run(cache, [a, b], layers, chunks)
    for layer, (q, k, v) in enumerate(layers):
        for seq, lead in ((a, [7]), (b, [])):
            want, kept_after = h2o_oracle(q[seq], k[seq], v[seq], lead + chunks, budget, recent)
            got = (
                torch.cat([first[layer][0], together[layer][0]], 1) if lead else together[layer][1]
            )
            assert (got - want).abs().max() < 1e-12
            kept = cache.kept_positions(seq, layer).tolist()
            assert kept == kept_after[-1]
            length = cache.length(seq)
            assert len(kept) == min(budget, length)
            assert set(range(length - recent, length)) <= set(kept)


@torch.no_grad()
def test_h2o_through_the_model_uses_the_recorded_queries():
    model = tiny()  # 3 layers, 9 query / 3 KV heads of 6 dims, float64
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))

    def decode(budget):
        cache = H2OCache(
            3, 3, 6, budget=budget, recent=2, max_seqs=2, max_new_per_step=10, dtype=torch.float64
        )
        return decode_model(model, cache, ids, [10, 4, 6]), cache

    full = model(ids)
    logits, _ = decode(budget=20)
    assert (logits - full).abs().max() < 1e-12
    logits, cache = decode(budget=6)
    assert (logits[:, :6] - full[:, :6]).abs().max() < 1e-12  # nothing evicted yet
    assert (logits[:, 10:] - full[:, 10:]).abs().max() > 1e-6  # evictions change the output
    for layer in range(3):
        kept = cache.kept_positions(0, layer).tolist()
        assert len(kept) == 6 and kept[-2:] == [18, 19]
    assert cache.mass[:, :, :6].gt(0).all() and cache.mass[:, :, 6:].eq(0).all()


def test_nbytes_is_fixed_by_the_budget():
    gen = torch.Generator().manual_seed(2)
    layers = history(gen, 1, 120, layers=2)
    cache = new_h2o(budget=10, recent=4, max_seqs=1, max_new=8, n_layers=2)
    seq = cache.add_sequence()
    capacity = 10 + 8
    kv = 2 * (2 * 1 * KV_HEADS * capacity * DIM) * 8  # K and V, float64
    tables = 2 * (2 * 1 * capacity) * 8  # int64 position and float64 mass per slot
    assert cache.nbytes == kv + tables
    run(cache, [seq], layers, [8] * 15)
    assert cache.length(seq) == 120 and cache.nbytes == kv + tables
    assert cache.nbytes < 120 * 2 * 2 * KV_HEADS * DIM * 8  # what a full cache would hold


def test_nan_in_empty_and_evicted_slots_does_not_change_outputs():
    gen = torch.Generator().manual_seed(3)
    layers = history(gen, 2, 40)
    outputs = []
    for poison in (False, True):
        cache = new_h2o(budget=6, recent=2, max_seqs=2, max_new=5)
        a, b = cache.add_sequence(), cache.add_sequence()
        run(cache, [a], layers, [5, 5, 5])  # evicted down to 6 kept tokens
        run(cache, [b], layers, [3])
        if poison:
            for seq in (a, b):
                empty = cache.slot_positions[0, cache._slot[seq]] < 0
                assert empty.any()
                cache.k[0, cache._slot[seq], :, empty] = torch.nan
                cache.v[0, cache._slot[seq], :, empty] = torch.nan
        outputs.append(run(cache, [a, b], layers, [1, 4, 1]))
    (clean,), (poisoned,) = outputs
    assert not poisoned.isnan().any() and torch.equal(clean, poisoned)


def test_fork_continues_like_the_parent_and_truncate_only_as_a_no_op():
    gen = torch.Generator().manual_seed(4)
    layers = history(gen, 2, 30)
    cache = new_h2o(budget=5, recent=2, max_seqs=2, max_new=4)
    parent = cache.add_sequence()
    run(cache, [parent], layers, [4, 4, 4])
    child = cache.fork(parent)
    assert torch.equal(cache.kept_positions(child, 0), cache.kept_positions(parent, 0))
    # Same continuation for both (row `child` of the data is replaced by the parent's).
    same = [tuple(t[[0, 0]] for t in layer) for layer in layers]
    (out,) = run(cache, [parent, child], same, [3, 1])
    assert torch.equal(out[0], out[1])
    cache.truncate(parent, cache.length(parent))  # no-op: allowed
    with pytest.raises(ValueError, match="cannot roll sequence 0 back from 16 to 15 tokens"):
        cache.truncate(parent, 15)
    assert cache.length(parent) == 16


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: new_h2o(budget=0, recent=0), ValueError, "budget must be an integer >= 1, got 0"),
        (lambda: new_h2o(budget=4, recent=-1), ValueError, "recent must be an integer >= 0"),
        (lambda: new_h2o(budget=4, recent=5), ValueError, r"recent \(5\) must be <= budget \(4\)"),
        (lambda: new_h2o(4, 2, max_new=0), ValueError, "max_new_per_step must be an integer >= 1"),
        (
            lambda: StreamingLLMCache(1, 1, 4, budget=3, sinks=4),
            ValueError,
            r"sinks \(4\) must be <= budget \(3\)",
        ),
        (
            lambda: StreamingLLMCache(1, 1, 4, budget=3, sinks=-1),
            ValueError,
            "sinks must be an integer >= 0, got -1",
        ),
    ],
    ids=[
        "budget-0",
        "recent-negative",
        "recent-over-budget",
        "max_new-0",
        "sinks-over",
        "sinks-neg",
    ],
)
def test_bad_arguments_raise_with_the_values(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_h2o_update_needs_this_steps_queries_of_the_right_shape():
    cache = new_h2o(budget=4, recent=1, max_new=3)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match="n_new=4 is more than max_new_per_step=3"):
        cache.prepare([seq], 4)
    cache.prepare([seq], 3)  # exactly at the limit
    k = torch.zeros(1, KV_HEADS, 3, DIM, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="needs layer 0's queries of this step"):
        cache.update(0, k, k)
    with pytest.raises(ValueError, match=r"q must be \(batch=1, heads \(a multiple of 2\)"):
        cache.record_queries(0, torch.zeros(1, 3, 3, DIM))
    cache.record_queries(0, torch.zeros(1, HEADS, 3, DIM, dtype=torch.float64))
    assert cache.update(0, k, k)[0].shape == (1, KV_HEADS, 3, DIM)
