"""PagedCache with a window: blocks behind every sequence's window go back to the pool,
what is kept stays exact, attention sees the window (the layer's, or the cache's), and what
cannot be done (a rollback into given-back blocks) raises.

Oracle: test_paged's fake model (each token's K/V a function of its whole prefix) and
`attnkit.attention(..., backend="reference")` over each sequence's full K/V with the
window's mask, float64: within 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_paged import HEAD_DIM, KV_HEADS, LAYERS, V_DIM, check_pool, expected, model_kv, run_step

import attnkit
from attnkit.cache import CacheFull
from attnkit.cache.paged import GIVEN_BACK, PagedCache
from attnkit.ops.masks import sinks, sliding_window, strided


def make(num_blocks, block_size, window, n_sinks=0, seed=0):
    return PagedCache(
        LAYERS, KV_HEADS, HEAD_DIM, num_blocks=num_blocks, block_size=block_size,
        v_head_dim=V_DIM, dtype=torch.float64, seed=seed, window=window, sinks=n_sinks,
    )  # fmt: skip


def kept(cache, seq):
    """{position: (layers, kv_heads, d) K and V} of `seq`'s tokens in blocks it still holds."""
    out, bs = {}, cache.block_size
    for t in range(cache.length(seq)):
        block = cache.block_table(seq)[t // bs]
        if block != GIVEN_BACK:
            out[t] = (cache.k_pool[:, block, t % bs], cache.v_pool[:, block, t % bs])
    return out


def check_window(cache, seq, tokens):
    """What `seq` keeps is exact; each block it gave back lies wholly between its sinks and
    the window its next token sees; every token that token sees is kept."""
    n, bs, w, s = cache.length(seq), cache.block_size, cache.window, cache.sinks
    want_k, want_v = expected(tokens[:n])  # (layers, kv_heads, n, d)
    held = kept(cache, seq)
    for t, (k, v) in held.items():
        assert torch.equal(k, want_k[:, :, t]) and torch.equal(v, want_v[:, :, t]), t
    for i, block in enumerate(cache.block_table(seq)):
        if block == GIVEN_BACK:
            assert i * bs >= s and (i + 1) * bs <= n - w + 1, (i, n)
    assert all(t in held for t in range(n) if t > n - w or t < s)


# -- blocks come back, what is kept stays exact -----------------------------------------------
class WindowedPagedCache(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([1, 3, 8]),
        window=st.integers(1, 20),
        n_sinks=st.sampled_from([0, 0, 1, 4]),
        num_blocks=st.integers(4, 60),
        seed=st.integers(0, 2**16),
    )
    def setup(self, block_size, window, n_sinks, num_blocks, seed):
        self.cache = make(num_blocks, block_size, window, n_sinks, seed)
        self.tokens: dict[int, list[int]] = {}
        self.freed: list[list[int]] = []

    @precondition(lambda self: len(self.tokens) < 5)
    @rule(prompt=st.lists(st.integers(0, 2), max_size=30), base=st.integers(0, 6))
    def add(self, prompt, base):
        donors = list(self.tokens.values()) + self.freed
        if donors and base:  # an earlier prompt's start: blocks given back may be reused
            prompt = donors[base % len(donors)][:25] + prompt
        seq = self.cache.add_sequence(token_ids=prompt or None)
        self.tokens[seq] = prompt
        reused = self.cache.length(seq)
        if len(prompt) > reused:
            self.do_step(seq, len(prompt) - reused, extend=False)
        else:
            del self.tokens[seq][reused:]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n_new=st.integers(1, 12))
    def step(self, data, n_new):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.tokens[seq] += data.draw(st.lists(st.integers(0, 2), min_size=n_new, max_size=n_new))
        self.do_step(seq, n_new)

    def do_step(self, seq, n_new, extend=True):
        begin, held = self.cache.length(seq), len(self.cache.block_table(seq))
        try:
            run_step(self.cache, [seq], self.tokens, n_new)
        except CacheFull:
            del self.tokens[seq][begin:]
            return
        live = [b for b in self.cache.block_table(seq) if b != GIVEN_BACK]
        bs, cache = self.cache.block_size, self.cache
        window_blocks = -(-(cache.window - 1 + n_new) // bs) + 1  # the step's keys, misaligned
        assert len(live) <= window_blocks + -(-cache.sinks // bs), (held, live)

    @precondition(lambda self: self.tokens and len(self.tokens) < 5)
    @rule(data=st.data())
    def fork(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        used = self.cache.pool.num_used
        child = self.cache.fork(seq)
        assert self.cache.pool.num_used == used
        self.tokens[child] = list(self.tokens[seq])

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        length = data.draw(st.integers(0, self.cache.length(seq)))
        bs, table = self.cache.block_size, self.cache.block_table(seq)
        first = max(0, length - self.cache.window + 1)
        needed = table[first // bs : -(-length // bs)]
        if GIVEN_BACK in needed:
            with pytest.raises(ValueError, match=f"cannot truncate sequence {seq} to length"):
                self.cache.truncate(seq, length)
            return
        self.cache.truncate(seq, length)
        del self.tokens[seq][length:]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.cache.free(seq)
        self.freed.append(self.tokens.pop(seq))

    @invariant()
    def keeps_its_window(self):
        check_pool(self.cache)
        for seq, tokens in self.tokens.items():
            assert self.cache.length(seq) == len(tokens)
            check_window(self.cache, seq, tokens)

    def teardown(self):
        for seq in list(self.tokens):
            self.cache.free(seq)
        check_pool(self.cache)
        assert self.cache.pool.num_used == 0 and self.cache.num_free_blocks == self.cache.num_blocks


WindowedPagedCache.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
test_windowed_paged_cache = WindowedPagedCache.TestCase


def test_a_long_sequence_holds_a_window_of_blocks():
    cache, tokens = make(8, 4, window=6), {}
    seq = cache.add_sequence()
    tokens[seq] = list(range(200))
    run_step(cache, [seq], tokens, 5)
    for _ in range(195):  # 200 tokens would need 50 blocks; the pool has 8
        run_step(cache, [seq], tokens, 1)
        assert cache.pool.num_used <= 3  # (6 - 1 + 1) keys over at most 3 blocks of 4
    # the last step (token 199) sees tokens 194-199: blocks 0-47 (tokens 0-191) went back
    assert cache.length(seq) == 200 and cache.block_table(seq).count(GIVEN_BACK) == 48
    check_window(cache, seq, tokens[seq])


def test_given_back_blocks_stay_indexed_for_a_later_prompt():
    cache, tokens = make(16, 4, window=4), {}
    a = cache.add_sequence(token_ids=list(range(14)))
    tokens[a] = list(range(14))
    run_step(cache, [a], tokens, 14)  # blocks 0-2 complete; the next step gives back 0-1
    tokens[a].append(99)
    run_step(cache, [a], tokens, 1)
    assert cache.block_table(a)[:2] == [GIVEN_BACK] * 2
    b = cache.add_sequence(token_ids=list(range(13)))  # the same first 12 tokens
    assert cache.length(b) == 12  # found in the index, given back or not
    check_pool(cache)


# -- attention sees the window -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("cache_window", "pattern", "seen"),
    [
        ((6, 0), None, sliding_window(6)),  # the cache's window over full attention
        ((6, 2), None, sliding_window(6) | sinks(2)),
        ((6, 0), sliding_window(4), sliding_window(4)),  # the layer's, narrower
        ((6, 2), sliding_window(6) | sinks(1), sliding_window(6) | sinks(1)),
        ((6, 0), sliding_window(9), sliding_window(6)),  # wider: narrowed to the cache's
        ((6, 0), strided(2), strided(2) & sliding_window(6)),  # not a window: through views
    ],
    ids=str,
)
@pytest.mark.parametrize("n_new", [1, 3])
def test_attention_sees_the_window(cache_window, pattern, seen, n_new):
    gen = torch.Generator().manual_seed(n_new)
    cache, tokens, seqs = make(60, 3, *cache_window, seed=2), {}, []
    for length in (0, 4, 11, 23):
        seq = cache.add_sequence()
        tokens[seq] = torch.randint(0, 50, (length + n_new,), generator=gen).tolist()
        for start in range(0, length, 5):  # in steps: blocks go back on the way
            run_step(cache, [seq], tokens, min(5, length - start))
        seqs.append(seq)
    assert GIVEN_BACK in cache.block_table(seqs[-1])
    starts = [cache.length(s) for s in seqs]
    cache.prepare(seqs, n_new)
    for layer in range(LAYERS):
        kv = [model_kv(tokens[s], b, b + n_new, layer) for s, b in zip(seqs, starts, strict=True)]
        k_new, v_new = (torch.stack(t) for t in zip(*kv, strict=True))
        q = torch.randn(
            len(seqs), 2 * KV_HEADS, n_new, HEAD_DIM, generator=gen, dtype=torch.float64
        )
        got = cache.attend(layer, q, k_new, v_new, pattern)
        for b, seq in enumerate(seqs):
            k, v = model_kv(tokens[seq], 0, len(tokens[seq]), layer)
            want = attnkit.attention(q[b : b + 1], k[None], v[None], seen, backend="reference")
            assert (got[b : b + 1] - want).abs().max().item() <= 1e-12


def test_a_rollback_of_the_last_step_always_works_and_further_back_says_why():
    cache, tokens = make(20, 4, window=5), {}
    seq = cache.add_sequence()
    tokens[seq] = list(range(30))
    run_step(cache, [seq], tokens, 20)
    run_step(cache, [seq], tokens, 6)  # a verification step of 6 tokens from position 20
    assert cache.block_table(seq)[:4] == [GIVEN_BACK] * 4  # tokens 0-15 behind 20's window
    cache.truncate(seq, 20)  # back to where the step began
    with pytest.raises(
        ValueError,
        match=r"cannot truncate sequence 0 to length=18: its next token would see tokens "
        r"from 14 on \(window=5\), but the block of tokens 12\.\.15 was given back",
    ):
        cache.truncate(seq, 18)
    assert cache.length(seq) == 20
    check_pool(cache)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 0}, "window must be a positive integer or None, got 0"),
        ({"window": True}, "window must be a positive integer or None, got True"),
        ({"window": 4, "sinks": -1}, "sinks must be a non-negative integer, got -1"),
        ({"sinks": 2}, "sinks=2 needs a window"),
    ],
)
def test_bad_window_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedCache(1, 1, 4, num_blocks=4, **kwargs)
