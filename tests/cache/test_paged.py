"""PagedCache: equals the contiguous cache, conserves blocks, shares prefixes, fails cleanly."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import attnkit
from attnkit.cache import CacheFull, ContiguousCache
from attnkit.cache.paged import GIVEN_BACK, PagedCache
from attnkit.ops.masks import causal

LAYERS, KV_HEADS, HEAD_DIM, V_DIM = 2, 2, 3, 5


# -- a fake model: each token's K/V depend on its whole prefix, as in a real decoder -----------
def prefix_hashes(tokens: list[int]) -> list[int]:
    out, h = [], 0
    for t in tokens:
        h = hash((h, t))
        out.append(h)
    return out


@functools.cache
def token_kv(prefix_hash: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(hash((prefix_hash, layer)) % 2**63)
    k = torch.randn(KV_HEADS, HEAD_DIM, generator=gen, dtype=torch.float64)
    return k, torch.randn(KV_HEADS, V_DIM, generator=gen, dtype=torch.float64)


def model_kv(tokens: list[int], start: int, stop: int, layer: int):
    """(kv_heads, stop - start, d) K and V of positions start..stop-1 of `tokens`."""
    pairs = [token_kv(h, layer) for h in prefix_hashes(tokens[:stop])[start:]]
    if not pairs:
        return torch.zeros(KV_HEADS, 0, HEAD_DIM, dtype=torch.float64), torch.zeros(
            KV_HEADS, 0, V_DIM, dtype=torch.float64
        )
    return torch.stack([k for k, _ in pairs], 1), torch.stack([v for _, v in pairs], 1)


def run_step(cache, seq_ids, tokens, n_new, *, ids="tensor", hide=(), layers=range(LAYERS)):
    """One step: prepare, then K/V from the fake model for every layer. Returns step, views.

    The cache is told the token ids as a tensor, as lists (None rows for `hide`), or not.
    """
    starts = [cache.length(s) for s in seq_ids]
    rows = [tokens[s][b : b + n_new] for s, b in zip(seq_ids, starts, strict=True)]
    token_ids = {
        "tensor": torch.tensor(rows),
        "lists": [None if s in hide else r for s, r in zip(seq_ids, rows, strict=True)],
        None: None,
    }[ids]
    step = cache.prepare(seq_ids, n_new, token_ids=token_ids)
    views = []
    for layer in layers:
        kv = [
            model_kv(tokens[s], b, b + n_new, layer) for s, b in zip(seq_ids, starts, strict=True)
        ]
        k, v = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
        views.append(cache.update(layer, k, v))
    return step, views


def stored(cache, seq):
    """(layers, kv_heads, length, d) K and V of `seq`, read straight from the storage."""
    n = cache.length(seq)
    if isinstance(cache, PagedCache):
        table = cache.block_table(seq)
        return tuple(
            pool[:, table].flatten(1, 2)[:, :n].transpose(1, 2)
            for pool in (cache.k_pool, cache.v_pool)
        )
    slot = cache._slot[seq]
    return cache.k[:, slot, :, :n], cache.v[:, slot, :, :n]


def expected(tokens: list[int]):
    """What `stored` must hold for a sequence with these tokens, from the fake model."""
    kv = [model_kv(tokens, 0, len(tokens), layer) for layer in range(LAYERS)]
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def check_pool(cache: PagedCache) -> None:
    """Allocator conservation: every block is exactly one of referenced, free, cached."""
    pool, n = cache.pool, cache.num_blocks
    counts = [0] * n
    for seq in cache.sequences:
        table = cache.block_table(seq)
        assert len(table) == -(-cache.length(seq) // cache.block_size)
        for block in table:
            if block != GIVEN_BACK:  # a windowed cache's, behind its window
                counts[block] += 1
    assert pool.ref_counts == counts
    referenced = {b for b in range(n) if counts[b] > 0}
    free, cached = list(pool.free), list(pool.cached)
    assert len(set(free)) == len(free), "a block is on the free list twice"
    assert not (set(free) & set(cached)) and not (set(free) & referenced)
    assert not (set(cached) & referenced)
    assert len(free) + len(cached) + len(referenced) == n
    assert set(free) | set(cached) | referenced == set(range(n))
    assert pool.num_used == len(referenced) and cache.num_free_blocks == len(free) + len(cached)
    assert all(b in pool.hash_of for b in cached) and not any(b in pool.hash_of for b in free)
    assert {b: h for h, b in pool.index.items()} == pool.hash_of
    assert cache.used_nbytes == len(referenced) * cache.block_nbytes


def snapshot(cache: PagedCache):
    pool = cache.pool
    return (
        list(pool.ref_counts),
        list(pool.free),
        list(pool.cached),
        dict(pool.index),
        {s: (cache.block_table(s), cache.length(s)) for s in cache.sequences},
        cache.k_pool.clone(),
        cache.v_pool.clone(),
    )


def assert_unchanged(before, cache: PagedCache) -> None:
    after = snapshot(cache)
    assert before[:5] == after[:5]
    assert torch.equal(before[5], after[5]) and torch.equal(before[6], after[6])


# -- 1 + 2: paged == contiguous under random operations; conservation after each -------------
class PagedEqualsContiguous(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 3, 16]),
        capacity=st.integers(1, 400),
        seed=st.integers(0, 2**16),
    )
    def setup(self, block_size, capacity, seed):
        dims = (LAYERS, KV_HEADS, HEAD_DIM)
        num_blocks = max(1, capacity // block_size)
        self.paged = PagedCache(
            *dims, num_blocks=num_blocks, block_size=block_size, v_head_dim=V_DIM,
            dtype=torch.float64, seed=seed,
        )  # fmt: skip
        self.contig = ContiguousCache(
            *dims, max_seqs=64, initial_len=4, v_head_dim=V_DIM, dtype=torch.float64
        )
        self.cid: dict[int, int] = {}  # paged id -> contiguous id
        self.tokens: dict[int, list[int]] = {}  # the model's tokens of each live sequence
        self.freed: list[list[int]] = []  # tokens of freed sequences: their blocks may be cached

    def others(self, *busy):
        return {
            s: tuple(t.clone() for t in stored(self.paged, s)) for s in self.cid if s not in busy
        }

    def assert_others_unchanged(self, before):
        for seq, kv in before.items():
            assert same(stored(self.paged, seq), kv), f"sequence {seq} changed"

    @precondition(lambda self: len(self.cid) < 6)
    @rule(
        prompt=st.lists(st.integers(0, 2), max_size=40),
        base=st.integers(0, 10),
        keep=st.integers(0, 60),
    )
    def add(self, prompt, base, keep):
        donors = [self.tokens[s] for s in sorted(self.cid)] + self.freed
        if donors and base:  # often extend an earlier sequence's tokens: prefix hits
            prompt = donors[base % len(donors)][:keep] + prompt
        before = self.others()
        seq = self.paged.add_sequence(token_ids=prompt if prompt else None)
        reused, bs = self.paged.length(seq), self.paged.block_size
        assert reused % bs == 0 and reused <= max(len(prompt) - 1, 0)
        self.cid[seq], self.tokens[seq] = self.contig.add_sequence(), prompt
        if reused:  # the contiguous cache computes what the paged one reused
            run_step(self.contig, [self.cid[seq]], {self.cid[seq]: prompt}, reused)
        self.assert_others_unchanged(before)
        if len(prompt) > reused:  # prefill the rest in both (may not fit: then stop there)
            self.do_step([seq], len(prompt) - reused, ids="tensor")
        else:
            self.tokens[seq] = prompt[:reused]

    @precondition(lambda self: self.cid)
    @rule(data=st.data(), n_new=st.integers(1, 20), ids=st.sampled_from(["tensor", "lists", None]))
    def step(self, data, n_new, ids):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.cid)), min_size=1, unique=True))
        for seq in seqs:
            self.tokens[seq] = self.tokens[seq] + data.draw(
                st.lists(st.integers(0, 2), min_size=n_new, max_size=n_new)
            )
        hide = data.draw(st.sets(st.sampled_from(seqs))) if ids == "lists" else set()
        self.do_step(seqs, n_new, ids, hide)

    def do_step(self, seqs, n_new, ids, hide=()):
        before, state = self.others(*seqs), snapshot(self.paged)
        try:
            step, views = run_step(self.paged, seqs, self.tokens, n_new, ids=ids, hide=hide)
        except CacheFull as full:
            assert full.needed > full.available == len(state[1]) + len(state[2])
            assert_unchanged(state, self.paged)
            for seq in seqs:  # the model never got these tokens either
                self.tokens[seq] = self.tokens[seq][: self.paged.length(seq)]
            return
        tokens = {self.cid[s]: self.tokens[s] for s in seqs}
        cstep, cviews = run_step(self.contig, [self.cid[s] for s in seqs], tokens, n_new)
        assert torch.equal(step.start, cstep.start) and step.kv_len == cstep.kv_len
        for (k, v), (ck, cv) in zip(views, cviews, strict=True):
            assert k.shape == ck.shape and v.shape == cv.shape
            for b, start in enumerate(step.start.tolist()):  # unmasked keys only
                n = start + n_new
                assert torch.equal(k[b, :, :n], ck[b, :, :n])
                assert torch.equal(v[b, :, :n], cv[b, :, :n])
        self.assert_others_unchanged(before)

    @precondition(lambda self: self.cid and len(self.cid) < 6)
    @rule(data=st.data())
    def fork(self, data):
        seq = data.draw(st.sampled_from(sorted(self.cid)))
        before, used = self.others(), self.paged.pool.num_used
        child = self.paged.fork(seq)
        assert self.paged.pool.num_used == used, "fork must not allocate"
        self.cid[child], self.tokens[child] = (
            self.contig.fork(self.cid[seq]),
            list(self.tokens[seq]),
        )
        self.assert_others_unchanged(before)

    @precondition(lambda self: self.cid)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(sorted(self.cid)))
        length = data.draw(st.integers(0, self.paged.length(seq)))
        before = self.others(seq)
        self.paged.truncate(seq, length)
        self.contig.truncate(self.cid[seq], length)
        del self.tokens[seq][length:]
        self.assert_others_unchanged(before)

    @precondition(lambda self: self.cid)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.cid)))
        before = self.others(seq)
        self.paged.free(seq)
        self.contig.free(self.cid.pop(seq))
        self.freed.append(self.tokens.pop(seq))
        self.assert_others_unchanged(before)

    @invariant()
    def paged_equals_contiguous(self):
        check_pool(self.paged)
        for seq, cseq in self.cid.items():
            assert self.paged.length(seq) == self.contig.length(cseq) == len(self.tokens[seq])
            assert same(stored(self.paged, seq), stored(self.contig, cseq))
            assert same(stored(self.paged, seq), expected(self.tokens[seq]))

    def teardown(self):
        for seq in list(self.cid):
            self.paged.free(seq)
        check_pool(self.paged)
        assert self.paged.pool.num_used == 0 and self.paged.used_nbytes == 0
        assert set(self.paged.pool.ref_counts) == {0}


PagedEqualsContiguous.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_paged_equals_contiguous = PagedEqualsContiguous.TestCase


# -- 3: CacheFull changes nothing; the limit and one past it -----------------------------------
def make(num_blocks, block_size, seed=0):
    return PagedCache(
        LAYERS, KV_HEADS, HEAD_DIM, num_blocks=num_blocks, block_size=block_size,
        v_head_dim=V_DIM, dtype=torch.float64, seed=seed,
    )  # fmt: skip


def test_cache_full_is_all_or_nothing_and_copy_on_write_spares_the_other_fork():
    cache, tokens = make(8, 4), {}
    a, c = cache.add_sequence(), cache.add_sequence()
    tokens[a], tokens[c] = [1] * 6 + [2] * 7, [3] * 16
    run_step(cache, [a], tokens, 6)
    run_step(cache, [c], tokens, 9)
    b = cache.fork(a)  # shares a's 2 blocks; the last one is half full
    tokens[b] = [1] * 6 + [4] * 7
    assert cache.block_table(a) == cache.block_table(b) and cache.num_free_blocks == 3
    before = snapshot(cache)
    # a: 2 new + 1 copy; b: 2 new (sole holder once a copied); c: 1 new -> 6 > 3
    with pytest.raises(CacheFull, match=r"needs 6 blocks \(5 new, 1 copy-on-write\).* 3 are free"):
        run_step(cache, [a, b, c], tokens, 7)
    assert_unchanged(before, cache)
    b_before = stored(cache, b)
    b_before = (b_before[0].clone(), b_before[1].clone())
    run_step(cache, [a, b], tokens, 1)  # exactly one copy: a copies, then b writes in place
    assert cache.block_table(a)[0] == cache.block_table(b)[0]
    assert cache.block_table(a)[1] != cache.block_table(b)[1]
    assert same(stored(cache, a), expected(tokens[a][:7]))
    assert same(stored(cache, b), expected(tokens[b][:7]))
    assert same(tuple(t[:, :, :6] for t in stored(cache, b)), b_before)
    check_pool(cache)


def test_exactly_filling_the_pool_succeeds_and_one_more_token_raises():
    cache = make(4, 3)
    seq = cache.add_sequence()
    cache.prepare([seq], 12)  # at the limit
    assert cache.num_free_blocks == 0 and cache.used_nbytes == cache.nbytes
    with pytest.raises(CacheFull, match="needs 1 blocks") as info:
        cache.prepare([seq], 1)  # just past it
    assert (info.value.needed, info.value.available) == (1, 0) and cache.length(seq) == 12
    fresh = make(4, 3)
    seq = fresh.add_sequence()
    with pytest.raises(CacheFull, match="whole pool has 4"):
        fresh.prepare([seq], 13)
    with pytest.raises(CacheFull, match="whole pool has 4"):  # never loops over the tokens
        fresh.prepare([seq], 10**15)
    assert fresh.length(seq) == 0 and fresh.num_free_blocks == 4


def test_copy_on_write_copies_count_at_the_limit():
    cache, tokens = make(3, 4), {}
    a = cache.add_sequence()
    tokens[a] = [5] * 9
    run_step(cache, [a], tokens, 6)
    b = cache.fork(a)
    tokens[b] = [5] * 6 + [6] * 3
    with pytest.raises(CacheFull, match="needs 2 blocks"):  # b: 1 new + 1 copy, 1 free
        cache.prepare([b], 3)
    run_step(cache, [b], tokens, 2)  # one copy, exactly the last free block
    assert cache.num_free_blocks == 0
    with pytest.raises(CacheFull, match=r"needs 1 blocks \(0 new, 1 copy-on-write\)"):
        cache.prepare([cache.fork(a)], 1)  # a's half-full block, shared again
    check_pool(cache)


# -- 4: prefix caching ------------------------------------------------------------------------
def prefill(cache, prompt, tokens):
    seq = cache.add_sequence(token_ids=prompt)
    tokens[seq] = list(prompt)
    run_step(cache, [seq], tokens, len(prompt) - cache.length(seq))
    return seq


def test_common_prefix_of_two_and_a_half_blocks_reuses_two_blocks():
    cache, tokens = make(12, 4), {}
    first = [7, 1, 3, 8, 2, 2, 9, 4, 6, 5]  # 2.5 blocks
    second = [*first, 0, 0, 1, 1]
    a = prefill(cache, first, tokens)
    b = cache.add_sequence(token_ids=torch.tensor(second))
    assert cache.length(b) == 8 and cache.block_table(b) == cache.block_table(a)[:2]
    assert [cache.pool.ref_counts[x] for x in cache.block_table(b)] == [2, 2]
    tokens[b] = second
    run_step(cache, [b], tokens, len(second) - 8)
    assert same(stored(cache, b), expected(second)) and same(stored(cache, a), expected(first))
    check_pool(cache)
    b_table = cache.block_table(b)
    cache.free(a)
    cache.free(b)
    assert cache.num_free_blocks == 12 and len(cache.pool.cached) == 3  # the full blocks
    c = cache.add_sequence(token_ids=second)  # reuse from cached blocks after both were freed
    assert cache.length(c) == 12 and cache.block_table(c) == b_table[:3]
    tokens[c] = second
    run_step(cache, [c], tokens, 2)
    assert same(stored(cache, c), expected(second))
    check_pool(cache)


def test_block_aligned_prompt_reuses_one_block_fewer():
    cache, tokens = make(8, 4), {}
    prompt = list(range(12))
    prefill(cache, prompt, tokens)
    assert cache.length(cache.add_sequence(token_ids=prompt)) == 8  # not 12: one token to compute
    assert cache.length(cache.add_sequence(token_ids=prompt[:8])) == 4
    assert cache.length(cache.add_sequence(token_ids=prompt[:4])) == 0
    assert cache.length(cache.add_sequence(token_ids=prompt[:5])) == 4
    assert cache.length(cache.add_sequence(token_ids=[])) == 0


def test_cached_blocks_are_evicted_least_recently_freed_first_when_the_pool_needs_them():
    cache, tokens = make(4, 2), {}
    x, y = prefill(cache, [1, 2, 3], tokens), prefill(cache, [5, 6, 7], tokens)
    cache.free(x)
    cache.free(y)
    assert len(cache.pool.cached) == 2 and cache.num_free_blocks == 4
    z = cache.add_sequence()
    cache.prepare([z], 6)  # 3 blocks: the 2 free ones, then evict x's cached block
    assert cache.length(cache.add_sequence(token_ids=[1, 2, 3])) == 0
    assert cache.length(cache.add_sequence(token_ids=[5, 6, 7])) == 2  # y's block survived
    assert cache.num_free_blocks == 0
    with pytest.raises(CacheFull, match="needs 1 blocks"):  # y's block is in use again
        cache.prepare([z], 2)
    check_pool(cache)


def test_steps_without_token_ids_and_unfinished_steps_are_not_indexed():
    cache, tokens = make(8, 2), {}
    seq = cache.add_sequence()
    tokens[seq] = [1, 2, 3, 4, 5]
    run_step(cache, [seq], tokens, 3, ids=None)
    assert not cache.pool.index
    run_step(cache, [seq], tokens, 2)  # ids known only from position 3: chain is broken
    assert not cache.pool.index
    other = cache.add_sequence()
    tokens[other] = [1, 2, 3, 4, 5]
    run_step(cache, [other], tokens, 5, layers=[0])  # abandoned after one layer
    cache.prepare([seq], 1)
    assert not cache.pool.index
    assert cache.length(cache.add_sequence(token_ids=[1, 2, 3, 4, 5])) == 0


def test_writing_into_an_indexed_block_unregisters_or_copies_it():
    cache, tokens = make(10, 4), {}
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    a = prefill(cache, prompt, tokens)
    b = cache.add_sequence(token_ids=[*prompt, 0])  # shares both blocks
    tokens[b] = [*prompt, 0]
    cache.truncate(b, 6)  # into the shared, indexed second block
    tokens[b] = [3, 1, 4, 1, 5, 9, 7, 7]
    run_step(cache, [b], tokens, 2)  # copy-on-write: a and the index keep the old block
    assert cache.block_table(b)[1] != cache.block_table(a)[1]
    assert same(stored(cache, a), expected(prompt)) and same(stored(cache, b), expected(tokens[b]))
    assert cache.length(cache.add_sequence(token_ids=[*prompt, 0])) == 8  # index kept a's
    check_pool(cache)
    c = prefill(cache, [8, 8, 8, 8, 8, 8, 8, 8], tokens)
    cache.truncate(c, 6)  # c alone holds its indexed second block
    old = cache.block_table(c)[1]
    tokens[c] = [8] * 6 + [0, 0]
    run_step(cache, [c], tokens, 2)
    assert cache.block_table(c)[1] == old and same(stored(cache, c), expected(tokens[c]))
    assert cache.length(cache.add_sequence(token_ids=[8] * 9)) == 4  # old content is gone
    assert cache.length(cache.add_sequence(token_ids=[*tokens[c], 1])) == 8  # new one indexed
    check_pool(cache)


# -- 5: attention through the views ---------------------------------------------------------
@pytest.mark.parametrize("n_new", [1, 3])
def test_attention_over_views_equals_attention_over_each_sequence_alone(n_new):
    gen = torch.Generator().manual_seed(n_new)
    heads = 2 * KV_HEADS
    cache, tokens = make(40, 3, seed=5), {}
    seqs = []
    for length in (0, 5, 7, 12):
        seq = cache.add_sequence()
        tokens[seq] = torch.randint(0, 50, (length + n_new,), generator=gen).tolist()
        if length:
            run_step(cache, [seq], tokens, length)
        seqs.append(seq)
    step, views = run_step(cache, seqs, tokens, n_new)
    assert step.kv_len == 12 + n_new
    for layer, (k_view, v_view) in enumerate(views):
        q = torch.randn(len(seqs), heads, n_new, HEAD_DIM, generator=gen, dtype=torch.float64)
        got = attnkit.attention(q, k_view, v_view, step.mask)
        for b, seq in enumerate(seqs):
            k, v = model_kv(tokens[seq], 0, len(tokens[seq]), layer)
            mask = causal() if n_new > 1 else None
            want = attnkit.attention(q[b : b + 1], k[None], v[None], mask)
            assert (got[b : b + 1] - want).abs().max().item() <= 1e-12


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_attend_at_decode_equals_attention_over_each_sequence_alone(backend, monkeypatch):
    # `auto` at decode reads the pool in place (the C++ kernel on CPU) instead of the views;
    # it must give what attention over each sequence's own K/V gives, and index the blocks
    # it completes just as `update` does. float64 throughout: within 1e-12.
    reads = []
    monkeypatch.setattr(PagedCache, "update", lambda *a: reads.append(1) or _update(*a))
    gen = torch.Generator().manual_seed(3)
    cache, tokens, seqs = make(40, 3, seed=7), {}, []
    for length in (2, 5, 11):  # ragged, blocks shuffled by the seed
        seq = cache.add_sequence()
        tokens[seq] = torch.randint(0, 50, (length + 1,), generator=gen).tolist()
        run_step(cache, [seq], tokens, length)
        seqs.append(seq)
    reads.clear()
    starts = [cache.length(s) for s in seqs]
    cache.prepare(seqs, 1, token_ids=torch.tensor([[tokens[s][-1]] for s in seqs]))
    for layer in range(LAYERS):
        kv = [model_kv(tokens[s], b, b + 1, layer) for s, b in zip(seqs, starts, strict=True)]
        k_new, v_new = (torch.stack(t) for t in zip(*kv, strict=True))
        q = torch.randn(len(seqs), 2 * KV_HEADS, 1, HEAD_DIM, generator=gen, dtype=torch.float64)
        got = cache.attend(layer, q, k_new, v_new, None, backend)
        for b, seq in enumerate(seqs):
            k, v = model_kv(tokens[seq], 0, len(tokens[seq]), layer)
            want = attnkit.attention(q[b : b + 1], k[None], v[None], None)
            assert (got[b : b + 1] - want).abs().max().item() <= 1e-12
    assert reads == ([] if backend == "auto" else [1] * LAYERS)  # auto built no views
    # the block the 11-token sequence completed (tokens 9..11) is indexed for reuse
    assert cache.length(cache.add_sequence(token_ids=tokens[seqs[2]] + [0])) == 12
    check_pool(cache)


_update = PagedCache.update


# -- 6: accounting --------------------------------------------------------------------------
def test_nbytes_is_the_pool_storage_and_used_nbytes_counts_referenced_blocks():
    cache, tokens = make(6, 4), {}
    storage = cache.k_pool.untyped_storage().nbytes() + cache.v_pool.untyped_storage().nbytes()
    assert cache.nbytes == storage == 6 * LAYERS * 4 * KV_HEADS * (HEAD_DIM + V_DIM) * 8
    assert cache.used_nbytes == 0
    a = prefill(cache, list(range(5)), tokens)  # 2 blocks (rounded up)
    assert cache.used_nbytes == 2 * cache.block_nbytes == 2 * LAYERS * 4 * KV_HEADS * 8 * 8
    b = cache.fork(a)  # shared blocks count once
    assert cache.used_nbytes == 2 * cache.block_nbytes and cache.nbytes == storage
    tokens[b] = [*tokens[a], 9]
    run_step(cache, [b], tokens, 1)  # copy-on-write: a third block
    assert cache.used_nbytes == 3 * cache.block_nbytes
    cache.free(a)
    cache.free(b)
    assert set(cache.pool.ref_counts) == {0} and cache.used_nbytes == 0
    assert cache.num_free_blocks == 6 and cache.nbytes == storage
    check_pool(cache)


# -- 7: bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_blocks": 0}, "num_blocks must be an integer >= 1, got 0"),
        ({"num_blocks": 4, "block_size": 0}, "block_size must be an integer >= 1, got 0"),
        ({"num_blocks": 4, "block_size": True}, "block_size must be an integer >= 1, got True"),
        ({"num_blocks": 4, "v_head_dim": 0}, "v_head_dim must be an integer >= 1, got 0"),
        ({"num_blocks": 4, "seed": "x"}, "seed must be an integer or None, got 'x'"),
    ],
)
def test_bad_constructor_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedCache(1, 1, 4, **kwargs)


def test_bad_token_ids_raise_and_change_nothing():
    cache = make(4, 2)
    seq = cache.add_sequence()
    before = snapshot(cache)
    for token_ids, match in [
        (
            torch.zeros(1, 3, dtype=torch.long),
            r"token_ids must be \(batch=1, n_new=2\), got \(1, 3\)",
        ),
        (torch.zeros(2, dtype=torch.long), r"must be \(batch=1, n_new=2\), got \(2,\)"),
        (torch.zeros(1, 2), "token_ids must be an integer tensor, got torch.float32"),
        ([[1, 2], [3, 4]], r"one row per sequence \(1\)"),
        ([[1]], r"token_ids\[0\] must hold n_new=2 token ids, got 1"),
        ([[1, 2.5]], r"token_ids\[0\] must be a list of integer token ids"),
    ]:
        with pytest.raises(ValueError, match=match):
            cache.prepare([seq], 2, token_ids=token_ids)
        assert_unchanged(before, cache)
    with pytest.raises(ValueError, match="token_ids must be a 1-D integer tensor, got 2-D"):
        cache.add_sequence(token_ids=torch.zeros(1, 3, dtype=torch.long))
    assert cache.sequences == [seq]


def test_protocol_misuse_raises_with_clear_messages():
    cache = make(4, 2)
    seq = cache.add_sequence()
    k, v = torch.zeros(1, KV_HEADS, 1, HEAD_DIM), torch.zeros(1, KV_HEADS, 1, V_DIM)
    with pytest.raises(RuntimeError, match="update\\(\\) before prepare\\(\\)"):
        cache.update(0, k, v)
    with pytest.raises(KeyError, match="sequence 7 is not in this cache"):
        cache.prepare([7], 1)
    with pytest.raises(ValueError, match="n_new must be an integer >= 1, got 0"):
        cache.prepare([seq], 0)
    cache.prepare([seq], 1)
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        cache.update(2, k, v)
    with pytest.raises(ValueError, match="v must have kv_heads=2 and head_dim=5"):
        cache.update(0, k, torch.zeros(1, KV_HEADS, 1, HEAD_DIM))
    with pytest.raises(ValueError, match=r"length must be an integer in \[0, 1\]"):
        cache.truncate(seq, 2)
    cache.free(seq)
    with pytest.raises(RuntimeError, match="update\\(\\) before prepare\\(\\)"):
        cache.update(0, k, v)  # its blocks went back to the pool: the step is over
    with pytest.raises(KeyError, match=f"sequence {seq} is not in this cache"):
        cache.free(seq)
    with pytest.raises(KeyError, match="sequence 99 is not in this cache"):
        cache.fork(99)
    with pytest.raises(KeyError, match="sequence 99 is not in this cache"):
        cache.block_table(99)
