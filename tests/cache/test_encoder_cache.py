"""EncoderCache: store once, read every step, nbytes, fork/free/truncate, and bad use."""

from __future__ import annotations

import pytest
import torch

from attnkit.cache import CacheFull
from attnkit.cache.encoder import EncoderCache

LAYERS, KV_HEADS, HEAD_DIM, V_HEAD_DIM = 3, 3, 59, 7


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only spins (70x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def new(max_seqs=3, **kwargs) -> EncoderCache:
    kwargs = {"v_head_dim": V_HEAD_DIM, "dtype": torch.float64} | kwargs
    return EncoderCache(LAYERS, KV_HEADS, HEAD_DIM, max_seqs=max_seqs, **kwargs)


def kv(batch: int, src: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, KV_HEADS, src, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, KV_HEADS, src, V_HEAD_DIM, generator=gen, dtype=torch.float64)
    return k.to(dtype), v.to(dtype)


def store_all(cache, seqs, src, lengths=None, seed=0):
    """Select `seqs` and store every layer's K/V; returns what was written per layer."""
    cache.select(seqs)
    written = []
    for layer in range(LAYERS):
        k, v = kv(len(seqs), src, seed + layer)
        cache.store(layer, k, v, None if lengths is None else torch.tensor(lengths))
        written.append((k, v))
    return written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("batch,src", [(1, 1), (3, 7), (2, 97)])
def test_nbytes_is_layers_batch_src_heads_and_both_head_dims(dtype, batch, src):
    cache = new(max_seqs=batch, dtype=dtype)
    assert cache.nbytes == 0  # nothing is allocated before the first source arrives
    seqs = [cache.add_sequence() for _ in range(batch)]
    cache.select(seqs)
    for layer in range(LAYERS):
        cache.store(layer, *kv(batch, src, layer, dtype))
    itemsize = torch.empty((), dtype=dtype).element_size()
    want = LAYERS * batch * src * KV_HEADS * (HEAD_DIM + V_HEAD_DIM) * itemsize
    assert cache.nbytes == want
    cache.select(seqs)
    assert cache.read(0)[0].dtype == dtype and cache.nbytes == want  # reading allocates nothing


def test_read_returns_what_was_stored_cut_at_the_longest_source_with_its_padding():
    cache = new()
    seqs = [cache.add_sequence() for _ in range(3)]
    written = store_all(cache, seqs, src=9, lengths=[5, 2, 6])
    cache.select(seqs)
    for layer, (k, v) in enumerate(written):
        k_view, v_view, mask = cache.read(layer)
        assert k_view.shape == (3, KV_HEADS, 6, HEAD_DIM) and v_view.shape[-1] == V_HEAD_DIM
        assert torch.equal(k_view, k[:, :, :6]) and torch.equal(v_view, v[:, :, :6])
        assert mask.dense(1, 6).squeeze().tolist() == [[j < n for j in range(6)] for n in (5, 2, 6)]
    assert [cache.length(s) for s in seqs] == [5, 2, 6]


def test_equal_lengths_need_no_mask_and_consecutive_slots_read_a_view():
    cache = new()
    seqs = [cache.add_sequence() for _ in range(3)]
    store_all(cache, seqs, src=7)
    cache.select(seqs)
    k, _, mask = cache.read(1)
    assert mask is None and k.data_ptr() == cache.k[1].data_ptr()  # no copy


def test_a_reordered_selection_reads_each_sequences_own_rows():
    cache = new()
    a, b, c = (cache.add_sequence() for _ in range(3))
    written = store_all(cache, [a, b, c], src=4, lengths=[4, 1, 3])
    cache.select([c, a])
    k, v, mask = cache.read(2)
    assert torch.equal(k, written[2][0][[2, 0]]) and torch.equal(v, written[2][1][[2, 0]])
    assert mask.dense(1, 4).squeeze().tolist() == [[True] * 3 + [False], [True] * 4]


def test_holds_tracks_layers_and_sequences():
    cache = new()
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.select([a])
    cache.store(0, *kv(1, 5, 0))
    assert cache.holds(0) and not cache.holds(1)
    cache.select([a, b])
    assert not cache.holds(0)  # b holds nothing yet
    with pytest.raises(RuntimeError, match=r"sequences \[1\] hold no encoder K/V for layer 0"):
        cache.read(0)


def test_a_longer_source_grows_the_buffer_and_keeps_what_was_stored():
    cache = new()
    a, b = cache.add_sequence(), cache.add_sequence()
    first = store_all(cache, [a], src=4)
    store_all(cache, [b], src=11, seed=5)
    assert cache.capacity == 11
    cache.select([a])
    assert torch.equal(cache.read(2)[0], first[2][0])


def test_fixed_max_len_takes_a_source_exactly_that_long_and_refuses_a_longer_one():
    cache = new(max_len=8)
    assert cache.nbytes > 0 and cache.capacity == 8  # allocated up front
    seq = cache.add_sequence()
    store_all(cache, [seq], src=8)
    with pytest.raises(CacheFull, match=r"a source of 9 tokens exceeds max_len 8"):
        store_all(cache, [seq], src=9)


def test_fork_copies_and_free_releases_the_slot():
    cache = new(max_seqs=2)
    parent = cache.add_sequence()
    written = store_all(cache, [parent], src=6, lengths=[4])
    child = cache.fork(parent)
    assert cache.length(child) == 4
    cache.select([child])
    store_all(cache, [child], src=6, seed=9)  # overwriting the child leaves the parent
    cache.select([parent])
    assert torch.equal(cache.read(1)[0], written[1][0][:, :, :4])
    cache.free(parent)
    assert cache.sequences == [child]
    again = cache.add_sequence()  # the freed slot is reused
    cache.select([again])
    assert not cache.holds(0)
    with pytest.raises(KeyError, match=r"sequence 0 is not in this cache"):
        cache.free(parent)
    with pytest.raises(CacheFull, match=r"all 2 sequence slots are in use"):
        cache.add_sequence()


def test_truncate_only_to_the_stored_length():
    cache = new()
    seq = cache.add_sequence()
    store_all(cache, [seq], src=6, lengths=[5])
    cache.truncate(seq, 5)  # a no-op: the source stays whole
    with pytest.raises(ValueError, match=r"cannot be truncated: sequence 0 has 5 source tokens"):
        cache.truncate(seq, 3)


# -- bad use --------------------------------------------------------------------------------
def test_using_the_cache_before_select_raises():
    cache = new()
    cache.add_sequence()
    for call in (lambda: cache.holds(0), lambda: cache.store(0, *kv(1, 3, 0))):
        with pytest.raises(RuntimeError, match=r"call cache.select\(seq_ids\) first"):
            call()


def test_the_decoder_protocol_points_to_select_store_read():
    cache = new()
    seq = cache.add_sequence()
    with pytest.raises(TypeError, match=r"EncoderCache is static: use select"):
        cache.prepare([seq], 1)
    with pytest.raises(TypeError, match=r"EncoderCache is static: use select"):
        cache.update(0, *kv(1, 1, 0))


@pytest.mark.parametrize(
    "k_shape,v_shape,lengths,error,match",
    [
        ((1, 3, 5, 58), (1, 3, 5, 7), None, ValueError, r"k must be \(batch=1, kv_heads=3"),
        ((1, 3, 5, 59), (1, 3, 5, 59), None, ValueError, r"v must be .*src_len, 7\)"),
        ((2, 3, 5, 59), (2, 3, 5, 7), None, ValueError, r"batch=1"),
        ((1, 3, 5, 59), (1, 3, 4, 7), None, ValueError, r"k and v differ in src_len: 5 and 4"),
        ((1, 3, 5, 59), (1, 3, 5, 7), [6], ValueError, r"in \[0, 5\], got \[6\]"),
        ((1, 3, 5, 59), (1, 3, 5, 7), [1, 2], ValueError, r"shape \(1,\)"),
    ],
    ids=["k-dim", "v-dim", "batch", "src-len", "length", "lengths-shape"],
)
def test_bad_stores_raise_and_change_nothing(k_shape, v_shape, lengths, error, match):
    cache = new()
    seq = cache.add_sequence()
    cache.select([seq])
    k, v = torch.zeros(k_shape, dtype=torch.float64), torch.zeros(v_shape, dtype=torch.float64)
    with pytest.raises(error, match=match):
        cache.store(0, k, v, None if lengths is None else torch.tensor(lengths))
    assert not cache.holds(0) and cache.nbytes == 0


@pytest.mark.parametrize("layer", [-1, LAYERS, True, 1.0])
def test_layers_out_of_range_raise(layer):
    cache = new()
    cache.select([cache.add_sequence()])
    with pytest.raises(ValueError, match=rf"layer must be an integer in \[0, {LAYERS}\)"):
        cache.holds(layer)


def test_bad_selections_and_constructor_arguments_raise():
    cache = new()
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match=r"must not repeat a sequence, got \[0, 0\]"):
        cache.select([seq, seq])
    with pytest.raises(KeyError, match=r"sequence 5 is not in this cache"):
        cache.select([5])
    with pytest.raises(ValueError, match=r"seq_ids must name at least one sequence"):
        cache.select([])
    for name, kwargs in (
        ("kv_heads", {"kv_heads": 0}),
        ("max_len", {"max_len": 0}),
        ("v_head_dim", {"v_head_dim": -2}),
    ):
        args = {"n_layers": 1, "kv_heads": 1, "head_dim": 4} | kwargs
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1"):
            EncoderCache(**args)
