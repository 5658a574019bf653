"""SlidingWindowCache: decoding equals full attention under `sliding_window(W) | sinks(S)`."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnkit
from attnkit.cache.window import SlidingWindowCache
from attnkit.layers.attention import Attention
from attnkit.masks import sinks, sliding_window
from attnkit.models.llama import Transformer
from attnkit.ops.masks import window_and_sinks
from models.test_llama import tiny

HEADS, KV_HEADS, DIM = 4, 2, 8


def draw(gen, batch, n):
    """Random q, k, v for `n` positions of `batch` sequences (float64)."""
    q = torch.randn(batch, HEADS, n, DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, KV_HEADS, n, DIM, generator=gen, dtype=torch.float64)
    return q, k, torch.randn(k.shape, generator=gen, dtype=torch.float64)


def windowed(q, k, v, window, n_sinks):
    """The oracle: attention over the whole history with the window-and-sinks mask."""
    mask = sliding_window(window) | sinks(n_sinks)
    return attnkit.attention(q, k, v, mask, backend="reference")


def decode(cache, seqs, q, k, v, chunks, start=0):
    """Feed positions [start, start + sum(chunks)) chunk by chunk; the concatenated outputs."""
    outs = []
    for n in chunks:
        step = cache.prepare(seqs, n)
        part = slice(start, start + n)
        k_view, v_view = cache.update(0, k[:, :, part], v[:, :, part])
        outs.append(attnkit.attention(q[:, :, part], k_view, v_view, step.mask))
        start += n
    return torch.cat(outs, dim=2)


def new_cache(window, n_sinks, max_seqs=1, max_new=10, n_layers=1):
    return SlidingWindowCache(
        n_layers,
        KV_HEADS,
        DIM,
        window=window,
        sinks=n_sinks,
        max_seqs=max_seqs,
        max_new_per_step=max_new,
        dtype=torch.float64,
    )


@pytest.mark.parametrize("chunks", [[1] * 30, [10, 4, 6, 10], [3, 10, 1, 9, 7]], ids=str)
@pytest.mark.parametrize("n_sinks", [0, 2])
@pytest.mark.parametrize("window", [1, 4, 7])
def test_decoding_equals_full_attention_with_the_window_mask(window, n_sinks, chunks):
    gen = torch.Generator().manual_seed(window * 10 + n_sinks)
    q, k, v = draw(gen, 2, 30)  # 30 positions: the ring (window - 1 + 10 slots) wraps
    cache = new_cache(window, n_sinks, max_seqs=2)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    got = decode(cache, seqs, q, k, v, chunks)
    assert (got - windowed(q, k, v, window, n_sinks)).abs().max() < 1e-12
    kept = cache.kept_positions(seqs[0]).tolist()
    assert kept == sorted({*range(min(n_sinks, 30)), *range(30 - window + 1, 30)})


@pytest.mark.parametrize(
    ("pattern", "seen"),
    [
        (None, (7, 2)),  # the cache's window over full attention (StreamingLLM)
        (sliding_window(7) | sinks(2), (7, 2)),  # the layer's, as the cache's
        (sliding_window(4) | sinks(1), (4, 1)),  # narrower: the ring holds what it needs
        (sliding_window(3), (3, 0)),
    ],
    ids=str,
)
@pytest.mark.parametrize("chunks", [[10, 4, 6, 10], [3, 10, 1, 9, 7]], ids=str)
def test_attend_reads_the_keys_in_position_order_with_the_window_as_a_pattern(
    monkeypatch, pattern, seen, chunks
):
    """Through `attend`, a step whose sequences start together reads sinks then window
    gathered in position order, the window a pattern at an offset (no dense mask), and
    answers as attention over the whole history; a ragged step still answers right."""
    import attnkit.cache.window as window_module

    calls = []

    def spy(q, k, v, mask=None, **kwargs):
        calls.append((k.shape[2], kwargs.get("q_offset"), mask))
        return attnkit.attention(q, k, v, mask, **kwargs)

    monkeypatch.setattr(window_module, "attention", spy)
    gen = torch.Generator().manual_seed(len(chunks))
    window, n_sinks = seen
    q, k, v = draw(gen, 2, 31)
    cache = new_cache(7, 2, max_seqs=3)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    start, outs = 0, []
    for n in chunks:
        cache.prepare(seqs, n)
        part = slice(start, start + n)
        outs.append(cache.attend(0, q[:, :, part], k[:, :, part], v[:, :, part], pattern))
        first = max(2, start - 7 + 1)  # the cache's: sinks 0, 1, then its window
        keys = start + n if first <= 2 else 2 + start + n - first
        assert calls[-1][:2] == (keys, start if first <= 2 else start - first + 2)
        assert window_and_sinks(calls[-1][2]) == seen
        start += n
    want = windowed(q[:, :, :30], k[:, :, :30], v[:, :, :30], window, n_sinks)
    assert (torch.cat(outs, dim=2) - want).abs().max() < 1e-12
    # a ragged step (with a third sequence, 3 tokens in): the slots' dense mask
    q3, k3, v3 = draw(gen, 1, 4)
    third = cache.add_sequence()
    cache.prepare([third], 3)
    cache.attend(0, q3[:, :, :3], k3[:, :, :3], v3[:, :, :3], pattern)
    cache.prepare([seqs[0], third], 1)
    new = [torch.cat((t[:1, :, 30:], t3[:, :, 3:])) for t, t3 in ((q, q3), (k, k3), (v, v3))]
    calls.clear()
    got = cache.attend(0, *new, pattern)
    assert not calls  # not through the ordered keys
    for row, (q_all, k_all, v_all) in enumerate(((q[:1], k[:1], v[:1]), (q3, k3, v3))):
        want = windowed(q_all, k_all, v_all, window, n_sinks)[:, :, -1:]
        assert (got[row : row + 1] - want).abs().max() < 1e-12


def test_nbytes_is_the_fixed_ring_and_does_not_grow_with_length():
    gen = torch.Generator().manual_seed(1)
    q, k, v = draw(gen, 1, 300)
    cache = new_cache(5, 3, max_seqs=2, max_new=16, n_layers=1)
    seq = cache.add_sequence()
    capacity = 3 + 5 - 1 + 16
    # K and V (float64) for 2 slots of 2 heads, plus one int64 position per slot.
    expected = 2 * (1 * 2 * KV_HEADS * capacity * DIM) * 8 + 2 * capacity * 8
    assert cache.capacity == capacity and cache.nbytes == expected
    decode(cache, [seq], q, k, v, [16] * 2)
    at_32 = cache.nbytes
    decode(cache, [seq], q, k, v, [16] * 16, start=32)
    assert cache.length(seq) == 288 and cache.nbytes == at_32 == expected


def test_ragged_batch_decodes_each_sequence_as_if_alone():
    gen = torch.Generator().manual_seed(2)
    window, n_sinks, lengths, steps = 5, 2, (9, 2, 23), 6
    cache = new_cache(window, n_sinks, max_seqs=3, max_new=8)
    seqs = [cache.add_sequence() for _ in lengths]
    histories = [draw(gen, 1, n + steps) for n in lengths]
    for seq, (q, k, v), n in zip(seqs, histories, lengths, strict=True):
        decode(cache, [seq], q, k, v, [8] * (n // 8) + [n % 8] * (n % 8 > 0))
    # Decode `steps` tokens for all three together: each row at its own position.
    for i in range(steps):
        step = cache.prepare(seqs, 1)
        at = [n + i for n in lengths]
        k_new = torch.cat([k[:, :, p : p + 1] for (_, k, _), p in zip(histories, at, strict=True)])
        v_new = torch.cat([v[:, :, p : p + 1] for (_, _, v), p in zip(histories, at, strict=True)])
        q_new = torch.cat([q[:, :, p : p + 1] for (q, _, _), p in zip(histories, at, strict=True)])
        assert step.positions.view(-1).tolist() == at
        out = attnkit.attention(q_new, *cache.update(0, k_new, v_new), step.mask)
        for row, ((q, k, v), p) in enumerate(zip(histories, at, strict=True)):
            alone = windowed(q[:, :, : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], window, n_sinks)
            assert (out[row] - alone[0, :, -1:]).abs().max() < 1e-12


def test_nan_in_empty_and_out_of_window_slots_does_not_change_outputs():
    gen = torch.Generator().manual_seed(3)
    window, n_sinks = 4, 1
    q, k, v = draw(gen, 2, 40)
    outputs = []
    for poison in (False, True):
        cache = new_cache(window, n_sinks, max_seqs=2, max_new=6)
        a, b = cache.add_sequence(), cache.add_sequence()
        decode(cache, [a], q[:1], k[:1], v[:1], [6, 6, 5])  # 17 tokens: the ring wrapped
        decode(cache, [b], q[1:], k[1:], v[1:], [3])  # 3 tokens: most slots empty
        if poison:
            for seq in (a, b):
                stored, n = cache.slot_positions[cache._slot[seq]], cache.length(seq)
                unused = (stored < 0) | ((stored >= n_sinks) & (stored <= n - window))
                assert unused.any()
                cache.k[:, cache._slot[seq], :, unused] = torch.nan
                cache.v[:, cache._slot[seq], :, unused] = torch.nan
        outs = []
        for i in range(5):  # decode the two together, then a chunk for one of them
            step = cache.prepare([a, b], 1)
            k_new = torch.cat([k[:1, :, 17 + i : 18 + i], k[1:, :, 3 + i : 4 + i]])
            v_new = torch.cat([v[:1, :, 17 + i : 18 + i], v[1:, :, 3 + i : 4 + i]])
            q_new = torch.cat([q[:1, :, 17 + i : 18 + i], q[1:, :, 3 + i : 4 + i]])
            outs.append(attnkit.attention(q_new, *cache.update(0, k_new, v_new), step.mask))
        outs.append(decode(cache, [b], q[1:], k[1:], v[1:], [6], start=8))
        outputs.append(outs)
    for clean, poisoned in zip(*outputs, strict=True):
        assert not poisoned.isnan().any() and torch.equal(clean, poisoned)
    want = windowed(q[1:, :, :14], k[1:, :, :14], v[1:, :, :14], window, n_sinks)
    assert (outputs[1][-1] - want[:, :, 8:]).abs().max() < 1e-12


@pytest.mark.parametrize("rollback", [1, 6])  # 6 = max_new_per_step: exactly at the limit
def test_truncate_within_the_buffer_equals_never_having_seen_the_dropped_tokens(rollback):
    gen = torch.Generator().manual_seed(4)
    window, n_sinks = 4, 2
    q, k, v = draw(gen, 1, 40)
    cache = new_cache(window, n_sinks, max_new=6)
    seq = cache.add_sequence()
    decode(cache, [seq], q, k, v, [6, 6, 6, 5])  # 23 tokens, ring of 9 slots wrapped twice
    cache.truncate(seq, 23 - rollback)
    assert cache.length(seq) == 23 - rollback
    # Different tokens take the dropped positions; the old ones must have no influence.
    q2, k2, v2 = (
        torch.cat([t[:, :, : 23 - rollback], -t[:, :, 23 - rollback :]], 2) for t in (q, k, v)
    )
    got = decode(cache, [seq], q2, k2, v2, [6, 6], start=23 - rollback)
    want = windowed(q2, k2, v2, window, n_sinks)[:, :, 23 - rollback : 35 - rollback]
    assert (got - want).abs().max() < 1e-12


def test_truncate_past_the_buffer_raises_and_changes_nothing():
    gen = torch.Generator().manual_seed(5)
    q, k, v = draw(gen, 1, 30)
    cache = new_cache(4, 2, max_seqs=2, max_new=6)
    seq = cache.add_sequence()
    decode(cache, [seq], q, k, v, [6, 6, 6, 5])
    before = cache.slot_positions.clone()
    with pytest.raises(ValueError, match="can roll back at most max_new_per_step=6 tokens"):
        cache.truncate(seq, 23 - 7)  # one past the limit
    assert cache.length(seq) == 23 and torch.equal(cache.slot_positions, before)
    short = cache.add_sequence()
    decode(cache, [short], q, k, v, [5])
    cache.truncate(short, 0)  # before the ring wraps, any rollback works
    assert cache.length(short) == 0 and cache.kept_positions(short).numel() == 0


def test_a_rollback_in_two_hops_is_refused_where_one_hop_is():
    # The ring holds the positions last written, up to the longest length reached: a
    # rollback in steps must not reach a key a later position overwrote (it used to pass,
    # and the next query silently missed that key).
    gen = torch.Generator().manual_seed(5)
    q, k, v = draw(gen, 1, 8)
    cache = new_cache(4, 0, max_new=2)  # ring of 5 slots
    seq = cache.add_sequence()
    decode(cache, [seq], q, k, v, [1] * 6)  # position 5 took position 0's slot
    with pytest.raises(ValueError, match="needs the key at position 0, which the ring no"):
        cache.truncate(seq, 3)
    cache.truncate(seq, 5)
    with pytest.raises(ValueError, match="needs the key at position 0, which the ring no"):
        cache.truncate(seq, 3)
    cache.truncate(seq, 4)  # needs positions 1-3, still there
    got = decode(cache, [seq], q, k, v, [2], start=4)
    assert (
        got - windowed(q[:, :, :6], k[:, :, :6], v[:, :, :6], 4, 0)[:, :, 4:]
    ).abs().max() < 1e-12


def test_fork_copies_the_ring_and_free_gives_a_clean_slot():
    gen = torch.Generator().manual_seed(6)
    window, n_sinks = 3, 1
    q, k, v = draw(gen, 1, 30)
    cache = new_cache(window, n_sinks, max_seqs=2, max_new=4)
    parent = cache.add_sequence()
    decode(cache, [parent], q, k, v, [4, 4, 4])
    child = cache.fork(parent)
    q2, k2, v2 = (torch.cat([t[:, :, :12], t[:, :, 12:].flip(2)], 2) for t in (q, k, v))
    got_child = decode(cache, [child], q2, k2, v2, [4, 4], start=12)
    got_parent = decode(cache, [parent], q, k, v, [4, 4], start=12)
    assert (got_child - windowed(q2, k2, v2, window, n_sinks)[:, :, 12:20]).abs().max() < 1e-12
    assert (got_parent - windowed(q, k, v, window, n_sinks)[:, :, 12:20]).abs().max() < 1e-12
    cache.free(child)
    fresh = cache.add_sequence()
    assert cache.kept_positions(fresh).numel() == 0
    got = decode(cache, [fresh], q, k, v, [4, 3])
    assert (
        got - windowed(q[:, :, :7], k[:, :, :7], v[:, :, :7], window, n_sinks)
    ).abs().max() < 1e-12


class WindowedAttention(Attention):
    """Attention whose cache-less forward uses a given mask instead of the model's causal."""

    mask = None

    def forward(self, x, ctx):
        return super().forward(x, ctx if ctx.cache else dataclasses.replace(ctx, mask=self.mask))


def decode_model(model, cache, ids, chunks):
    """Logits of `ids` fed through `model` and `cache` chunk by chunk, concatenated."""
    for _ in range(ids.shape[0]):
        cache.add_sequence()
    starts = [sum(chunks[:i]) for i in range(len(chunks))]
    pieces = [model(ids[:, s : s + n], cache=cache) for s, n in zip(starts, chunks, strict=True)]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize(("window", "n_sinks", "chunks"), [(4, 2, [10, 4, 6]), (7, 0, [1] * 20)])
@torch.no_grad()
def test_model_decoding_equals_a_full_forward_with_windowed_attention(window, n_sinks, chunks):
    causal_model = tiny()  # 3 layers, 9 query / 3 KV heads of 6 dims, float64

    def factory(c, i):
        attn = WindowedAttention(i, c.hidden_size, 9, 3, c.head_dim)
        attn.mask = sliding_window(window) | sinks(n_sinks)
        return attn

    model = Transformer(causal_model.config, attention=factory).double().eval()
    model.load_state_dict(causal_model.state_dict())
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache = SlidingWindowCache(
        3, 3, 6, window=window, sinks=n_sinks, max_seqs=2, max_new_per_step=10, dtype=torch.float64
    )
    assert (decode_model(model, cache, ids, chunks) - full).abs().max() < 1e-12
    assert (causal_model(ids) - full).abs().max() > 1e-3  # the window matters


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(window=0), "window must be an integer >= 1, got 0"),
        (dict(window=4, sinks=-1), "sinks must be an integer >= 0, got -1"),
        (dict(window=4, sinks=1.5), "sinks must be an integer >= 0, got 1.5"),
        (dict(window=4, max_new_per_step=0), "max_new_per_step must be an integer >= 1, got 0"),
    ],
    ids=["window-0", "sinks-negative", "sinks-float", "max_new-0"],
)
def test_bad_arguments_raise_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindowCache(1, 1, 4, **kwargs)


def test_a_step_larger_than_max_new_per_step_raises_and_at_the_limit_works():
    cache = new_cache(4, 0, max_new=5)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match="n_new=6 is more than max_new_per_step=5.*in chunks"):
        cache.prepare([seq], 6)
    assert cache.length(seq) == 0
    assert cache.prepare([seq], 5).kv_len == 5


@pytest.mark.parametrize(("window", "n_sinks"), [(1, 0), (4, 0), (4, 2), (7, 3)])
def test_decode_storage_lists_exactly_the_keys_the_mask_shows(window, n_sinks):
    # DecodeStack reads a ring step through this table: block `row * stride + slot` of
    # the views is `slot` of buffer row `row`; each sequence lists its visible keys, its
    # new token's slot last (where the kernel writes it). Checked against the step's mask.
    gen = torch.Generator().manual_seed(window * 10 + n_sinks)
    cache = new_cache(window, n_sinks, max_seqs=3, max_new=5, n_layers=2)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (2, 13, 0), strict=True):  # one fresh, one wrapped, one empty
        for chunk in [5] * (n // 5) + [n % 5] * bool(n % 5):
            cache.prepare([seq], chunk)
    for _ in range(6):
        order = seqs[::-1]  # rows out of slot order
        step = cache.prepare(order, 1)
        storage = cache.decode_storage()
        assert (storage.window, storage.sinks) == (window, n_sinks)
        stride = cache.k.stride(1) // cache.k.stride(3)
        for b, seq in enumerate(order):
            row, length = cache._slot[seq], int(storage.starts[b]) + 1
            listed = storage.block_table[b, :length]
            assert torch.equal(listed // stride, torch.full_like(listed, row))
            slots = listed % stride
            everything = torch.ones(len(order), 1, 1, step.kv_len, dtype=torch.bool)
            mask = everything if step.mask is None else step.mask.dense(1, step.kv_len)
            visible = mask.expand(len(order), -1, -1, -1)[b, 0, 0]
            shown = set(cache.slot_positions[row, visible.nonzero().view(-1)].tolist())
            positions = cache.slot_positions[row, slots].tolist()
            assert sorted(positions) == sorted(shown) and len(set(positions)) == length
            assert positions[-1] == int(step.start[b])  # the new token, written last
            k = torch.randn(2, cache.kv_heads, length, cache.head_dim, generator=gen)
            cache.k[:, row][:, :, slots] = k.to(cache.k.dtype)  # through the buffer...
            read = storage.k[:, listed, 0].transpose(1, 2)  # ...read through the table
            assert torch.equal(read, k.to(cache.k.dtype))
    nothing = cache.prepare(seqs, 2)  # a step of two tokens: layer by layer
    assert nothing.n_new == 2 and cache.decode_storage() is None
