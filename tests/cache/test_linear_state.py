"""LinearStateCache: a fixed-size state per sequence, never rolled back."""

from __future__ import annotations

import pytest
import torch

from attnkit.cache.base import CacheFull
from attnkit.cache.linear_state import LinearStateCache
from attnkit.ops.linear import linear_attention

LAYERS, KV_HEADS, DIM, V_DIM = 2, 3, 5, 4  # elu features: feat = DIM


def new_cache(max_seqs=3, dtype=torch.float64):
    return LinearStateCache(LAYERS, KV_HEADS, DIM, V_DIM, max_seqs=max_seqs, dtype=dtype)


def draw(gen, batch, n):
    """q (9 heads), k, v for `n` tokens of `batch` sequences (float64)."""
    q = torch.randn(batch, 9, n, DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, KV_HEADS, n, DIM, generator=gen, dtype=torch.float64)
    return q, k, torch.randn(batch, KV_HEADS, n, V_DIM, generator=gen, dtype=torch.float64)


def run(cache, seqs, q, k, v, layer=0):
    """One step through the cache, as a linear-attention layer does it."""
    cache.prepare(seqs, q.shape[2])
    out, state = linear_attention(q, k, v, state=cache.state(layer), return_state=True)
    cache.set_state(layer, *state)
    return out


def test_nbytes_is_the_preallocated_state_and_constant_in_sequence_length():
    cache = new_cache()
    itemsize = torch.finfo(torch.float64).bits // 8
    expected = LAYERS * 3 * KV_HEADS * DIM * (V_DIM + 1) * itemsize
    assert cache.nbytes == expected
    seq, gen = cache.add_sequence(), torch.Generator().manual_seed(0)
    for n in (1, 100, 1000):
        run(cache, [seq], *draw(gen, 1, n))
        assert cache.nbytes == expected
    assert cache.length(seq) == 1101


def test_chunks_through_the_cache_equal_one_pass_for_ragged_batches_and_any_slot_order():
    gen = torch.Generator().manual_seed(1)
    cache = new_cache()
    a, b, c = (cache.add_sequence() for _ in range(3))
    q, k, v = draw(gen, 3, 20)
    whole = linear_attention(q, k, v)
    # Sequence c first gets 6 tokens alone, then a and c go together (c ahead by 6), slot
    # order reversed; b stays untouched throughout and must keep a zero state.
    run(cache, [c], q[2:, :, :6], k[2:, :, :6], v[2:, :, :6])
    out = run(cache, [c, a], *(x[[2, 0]][:, :, 6:13] for x in (q, k, v)))
    assert torch.allclose(out[0], whole[2, :, 6:13], atol=1e-12, rtol=0)
    a_alone = linear_attention(q[:1, :, 6:13], k[:1, :, 6:13], v[:1, :, 6:13])
    assert torch.allclose(out[1], a_alone[0], atol=1e-12, rtol=0)
    assert cache.length(a) == 7 and cache.length(c) == 13 and cache.length(b) == 0
    cache.prepare([b], 1)
    assert not cache.state(0).S.any() and not cache.state(1).z.any()


def test_a_reused_slot_starts_from_a_zero_state():
    gen = torch.Generator().manual_seed(2)
    cache = new_cache(max_seqs=1)
    seq = cache.add_sequence()
    run(cache, [seq], *draw(gen, 1, 5))
    cache.free(seq)
    seq = cache.add_sequence()
    cache.prepare([seq], 1)
    assert cache.length(seq) == 1
    assert not cache.state(0).S.any() and not cache.state(0).z.any()


def test_fork_copies_the_state_and_the_copies_then_diverge_independently():
    gen = torch.Generator().manual_seed(3)
    cache = new_cache()
    parent = cache.add_sequence()
    q, k, v = draw(gen, 1, 12)
    run(cache, [parent], q[:, :, :8], k[:, :, :8], v[:, :, :8])
    child = cache.fork(parent)
    assert cache.length(child) == 8
    tail = [x[:, :, 8:] for x in (q, k, v)]
    out_child = run(cache, [child], *tail)
    cache.prepare([parent], 1)  # the parent's state is still the one after 8 tokens
    out_parent, _ = linear_attention(
        *[x[:, :, 8:9] for x in (q, k, v)], state=cache.state(0), return_state=True
    )
    assert torch.allclose(out_child, linear_attention(q, k, v)[:, :, 8:], atol=1e-12, rtol=0)
    assert torch.allclose(out_parent, out_child[:, :, :1], atol=1e-12, rtol=0)


def test_truncate_to_the_current_length_is_a_no_op_and_otherwise_explains_why_not():
    gen = torch.Generator().manual_seed(4)
    cache = new_cache()
    seq = cache.add_sequence()
    run(cache, [seq], *draw(gen, 1, 6))
    cache.prepare([seq], 1)
    before = cache.state(0)
    cache.truncate(seq, 7)
    assert cache.length(seq) == 7 and torch.equal(cache.state(0).S, before.S)
    with pytest.raises(ValueError, match="from 7 to 6 tokens: a linear-attention state is a run"):
        cache.truncate(seq, 6)
    with pytest.raises(ValueError, match=r"length must be an integer in \[0, 7\]"):
        cache.truncate(seq, 8)
    assert cache.length(seq) == 7


def test_bad_calls_name_the_problem():
    cache = new_cache(max_seqs=1)
    with pytest.raises(RuntimeError, match=r"state\(\) before prepare\(\)"):
        cache.state(0)
    seq = cache.add_sequence()
    with pytest.raises(CacheFull, match="all 1 sequence slots are in use"):
        cache.add_sequence()
    cache.prepare([seq], 2)
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 2\), got 2"):
        cache.state(2)
    S, z = cache.state(1)
    with pytest.raises(ValueError, match=r"S must have shape \(1, 3, 5, 4\) for this step"):
        cache.set_state(1, S[..., :3], z)
    with pytest.raises(ValueError, match=r"z must have shape \(1, 3, 5\) for this step"):
        cache.set_state(1, S, z.unsqueeze(0))
    with pytest.raises(TypeError, match="keeps a recurrent state, not keys and values"):
        cache.update(0, torch.zeros(1, 3, 2, 5), torch.zeros(1, 3, 2, 5))
    with pytest.raises(ValueError, match="n_new must be an integer >= 1, got 0"):
        cache.prepare([seq], 0)
    cache.free(seq)
    with pytest.raises(KeyError, match="sequence 0 is not in this cache"):
        cache.free(seq)
    with pytest.raises(ValueError, match="feature_dim must be an integer >= 1, got 0"):
        LinearStateCache(1, 1, 0, 4)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype, got torch.int64"):
        LinearStateCache(1, 1, 4, 4, dtype=torch.long)
