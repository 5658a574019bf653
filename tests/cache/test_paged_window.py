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
from attn_testing import tiny_transformer
from attnkit.cache import CacheFull
from attnkit.cache.base import KVCache
from attnkit.cache.layered import LayeredCache
from attnkit.cache.paged import GIVEN_BACK, PagedCache
from attnkit.ops.masks import sinks, sliding_window, strided, window_and_sinks


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


def next_turn_after_eviction(window):
    """A 40-token conversation in a pool of 12 blocks of 4, then another request's 36
    tokens (evicting 7 of its blocks), then the conversation's next turn: (cache, tokens,
    its sequence)."""
    cache, tokens = make(12, 4, window=window), {}
    a = cache.add_sequence(token_ids=list(range(40)))
    tokens[a] = list(range(40))
    for _ in range(10):
        run_step(cache, [a], tokens, 4)  # with a window: gives back blocks behind it
    cache.free(a)
    b = cache.add_sequence()
    tokens[b] = [7] * 36
    run_step(cache, [b], tokens, 36)
    cache.free(b)
    c = cache.add_sequence(token_ids=[*tokens[a], 90])
    tokens[c] = [*tokens[a], 90, 91]
    return cache, tokens, c


def test_a_later_turn_finds_its_window_after_the_early_blocks_were_evicted():
    # A conversation's next turn repeats its whole history. With a window only the blocks
    # its next token sees must still be cached: the first turn's early blocks were given
    # back first, so evicted first, and the next turn starts from 40 of its 41 tokens.
    cache, tokens, c = next_turn_after_eviction(window=6)
    assert cache.length(c) == 40
    assert cache.block_table(c)[:8] == [GIVEN_BACK] * 8  # 0-31 behind token 40's window
    run_step(cache, [c], tokens, 2)
    check_window(cache, c, tokens[c])
    check_pool(cache)
    # keeping every token, the chain needs the early blocks: the tail went first (freed
    # tail first), and the turn finds its first 3 blocks
    cache, _, c = next_turn_after_eviction(window=None)
    assert cache.length(c) == 12


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


@pytest.mark.parametrize(
    ("cache_window", "pattern", "seen"),
    [
        ((6, 0), None, sliding_window(6)),
        ((6, 2), None, sliding_window(6) | sinks(2)),
        ((6, 0), sliding_window(4), sliding_window(4)),
        ((6, 4), sliding_window(6) | sinks(1), sliding_window(6) | sinks(1)),
        ((None, 0), sliding_window(5) | sinks(2), sliding_window(5) | sinks(2)),  # layer's
        ((None, 0), sliding_window(8), sliding_window(8)),
    ],
    ids=str,
)
@pytest.mark.parametrize("n_new", [2, 7])
def test_a_chunk_gathers_only_the_blocks_its_window_sees(
    monkeypatch, cache_window, pattern, seen, n_new
):
    """Sequences at one position, a step of several tokens (a prefill chunk): attention
    reads the sinks' and the window's blocks only, at an offset that keeps the window's
    distances, and answers as over the whole history."""
    import attnkit.cache.paged as paged

    keys_read = []

    def spy(q, k, v, mask=None, **kwargs):
        keys_read.append(k.shape[2])
        return attnkit.attention(q, k, v, mask, **kwargs)

    monkeypatch.setattr(paged, "attention", spy)
    gen = torch.Generator().manual_seed(n_new)
    cache, tokens, bs = make(80, 3, *cache_window, seed=3), {}, 3
    seqs = [cache.add_sequence() for _ in range(3)]
    length = 25
    for seq in seqs:
        tokens[seq] = torch.randint(0, 50, (length + n_new,), generator=gen).tolist()
    for start in range(0, length, 5):
        run_step(cache, seqs, tokens, min(5, length - start))
    cache.prepare(seqs, n_new)
    for layer in range(LAYERS):
        kv = [model_kv(tokens[s], length, length + n_new, layer) for s in seqs]
        k_new, v_new = (torch.stack(t) for t in zip(*kv, strict=True))
        q = torch.randn(3, 2 * KV_HEADS, n_new, HEAD_DIM, generator=gen, dtype=torch.float64)
        got = cache.attend(layer, q, k_new, v_new, pattern)
        for b, seq in enumerate(seqs):
            k, v = model_kv(tokens[seq], 0, len(tokens[seq]), layer)
            want = attnkit.attention(q[b : b + 1], k[None], v[None], seen, backend="reference")
            assert (got[b : b + 1] - want).abs().max().item() <= 1e-12
    window, n_sinks = window_and_sinks(seen)
    first_block = (length - window + 1) // bs  # holds the first query's oldest key
    sink_blocks = -(-n_sinks // bs)
    assert keys_read == [sink_blocks * bs + length + n_new - first_block * bs] * LAYERS


def test_a_step_that_does_not_fit_changes_nothing_and_counts_what_the_window_passes():
    cache, tokens = make(5, 2, window=4), {}
    a = cache.add_sequence()
    tokens[a] = list(range(40))
    run_step(cache, [a], tokens, 8)
    run_step(cache, [a], tokens, 1)  # token 8 sees 5-8: blocks 0-1 went back
    before = (cache.block_table(a), cache.num_free_blocks, cache.length(a))
    assert before[0][:2] == [GIVEN_BACK] * 2 and before[1:] == (2, 9)
    with pytest.raises(CacheFull, match=r"needs 4 blocks \(4 new, 0 copy-on-write\) but 3"):
        cache.prepare([a], 8)  # 2 free + 1 the window would pass (tokens 4-5) < 4
    assert (cache.block_table(a), cache.num_free_blocks, cache.length(a)) == before
    cache.truncate(a, 8)  # so the last step can still be taken back
    run_step(cache, [a], tokens, 3)  # 2 free + 1 passed (token 8's block 2 is kept)
    check_window(cache, a, tokens[a])
    check_pool(cache)


@pytest.mark.parametrize("num_blocks", [3, 4])
def test_a_fork_left_alone_with_a_block_the_window_passes_writes_it_without_a_copy(num_blocks):
    # b (a fork of a, cut back into a's second block) shares that block with a until a's
    # window passes it: the step then gives it back first, and b writes it in place. With
    # 3 blocks, counting a copy would have said the step does not fit.
    cache = PagedCache(1, 1, 2, num_blocks=num_blocks, block_size=4, window=4)
    a = cache.add_sequence()
    cache.prepare([a], 8)
    cache.stored_every_layer()
    b = cache.fork(a)
    cache.truncate(b, 6)
    cache.prepare([a], 3)
    cache.stored_every_layer()
    shared = cache.block_table(b)[1]
    assert cache.block_table(a)[1] == shared and cache.pool.ref_counts[shared] == 2
    cache.prepare([a, b], 1)
    assert cache.block_table(a)[1] == GIVEN_BACK and cache.block_table(b)[1] == shared
    assert cache.num_free_blocks == num_blocks - 3
    check_pool(cache)


def test_a_long_prefill_that_does_not_fit_leaves_the_cache_as_it_was():
    # Transformer.forward feeds long prefills in pieces only into caches that can take
    # them back; a window gives blocks back between pieces, so this one goes whole.
    model = tiny_transformer(0).float()
    c = model.config
    cache = PagedCache(
        c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks=685, block_size=3,
        window=8,
    )  # fmt: skip
    seq = cache.add_sequence()
    ids = torch.randint(0, 101, (1, 4110), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :10], cache=cache)
        table = cache.block_table(seq)
        with pytest.raises(CacheFull, match="needs 1366 blocks"):
            model(ids[:, 10:], cache=cache)
        assert cache.length(seq) == 10 and cache.block_table(seq) == table
        model(ids[:, 10:11], cache=cache)  # and it goes on from there


def test_a_layered_cache_reuses_the_prefix_every_group_holds():
    # A windowed group may hold a long prefix (its early blocks given back and evicted)
    # without a shorter one; the other group only a short one. They must agree on a
    # prefix both hold, not cut the windowed group back into blocks it gave back.
    window, full = (
        PagedCache(1, KV_HEADS, HEAD_DIM, num_blocks=12, block_size=4, v_head_dim=V_DIM,
                   dtype=torch.float64, window=w)
        for w in (6, None)
    )  # fmt: skip
    cache = LayeredCache([([0], window), ([1], full)])
    tokens = {}
    a = cache.add_sequence(token_ids=list(range(40)))
    tokens[a] = list(range(40))
    for _ in range(10):
        run_step(cache, [a], tokens, 4)
    cache.free(a)
    b = cache.add_sequence()
    tokens[b] = [7] * 36
    run_step(cache, [b], tokens, 36)  # evicts the early blocks of both groups
    cache.free(b)
    turn = [*tokens[a], 90]
    assert (window.reusable_length(turn), full.reusable_length(turn)) == (40, 12)
    c = cache.add_sequence(token_ids=turn)
    # 12 tokens is no prefix of the windowed group's (it gave back and lost tokens 4-7,
    # which token 12's window needs), nor 8 or 4 (their first blocks were evicted)
    assert cache.length(c) == window.length(c) == full.length(c) == 0
    assert cache.sequences == window.sequences == full.sequences == [c]
    tokens[c] = turn
    run_step(cache, [c], tokens, 41)
    want_k, want_v = expected(turn)  # the window group holds layer 0
    for t, (k, v) in kept(window, c).items():
        assert torch.equal(k[0], want_k[0, :, t]) and torch.equal(v[0], want_v[0, :, t])
    check_pool(window)
    check_pool(full)


@pytest.mark.parametrize("route", ["group's attend", "views and layer_mask"])
def test_in_a_layered_cache_full_attention_layers_see_the_window(monkeypatch, route):
    # A LayeredCache hands attention to its group's own `attend` (a paged pool decodes in
    # place); through the protocol's update() + layer_mask() instead, the mask must still
    # hide the given-back blocks (their slots read block 0).
    import attnkit.cache.paged as paged

    decoded, real = [], paged.paged_decode

    def counted(*args, **kwargs):
        decoded.append(1)
        return real(*args, **kwargs)

    if route == "views and layer_mask":
        monkeypatch.setattr(LayeredCache, "attend", KVCache.attend)
    else:
        monkeypatch.setattr(paged, "paged_decode", counted)
    model, windowed = tiny_transformer(0), tiny_transformer(0, sliding_window=4)
    ids = torch.randint(0, 101, (1, 24), generator=torch.Generator().manual_seed(1))
    c = model.config
    inner = PagedCache(
        c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks=40, block_size=2,
        dtype=torch.float64, window=4,
    )  # fmt: skip
    cache = LayeredCache([(range(c.num_hidden_layers), inner)])
    cache.add_sequence()
    with torch.no_grad():
        steps = [model(ids[:, :10], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 24)]
        want = windowed(ids)
    assert inner.block_table(0).count(GIVEN_BACK) == 10
    assert (torch.cat(steps, 1) - want).abs().max() < 1e-12
    assert len(decoded) == (0 if route == "views and layer_mask" else 14 * c.num_hidden_layers)


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
        ({"window": 0}, r"window must be an integer in \[1, 2\*\*63\) or None, got 0"),
        ({"window": True}, r"window must be an integer in \[1, 2\*\*63\) or None, got True"),
        ({"window": 4, "sinks": -1}, r"sinks must be an integer in \[0, 2\*\*63\), got -1"),
        ({"sinks": 2}, "sinks=2 needs a window"),
    ],
)
def test_bad_window_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PagedCache(1, 1, 4, num_blocks=4, **kwargs)
