"""QuantizedCache: int8 K/V with one absmax scale per (token, KV head), dequantized on read.

The error bound every test leans on: `q = round(x / s)` with `s = max|row| / 127` moves an
element by at most `s / 2 = max|row| / 254`. The scale is stored in float32 (relative
rounding 2^-24) and the read-back product is rounded once more in the view's dtype, so in
float64 the bound is `max|row| / 254 · (1 + 2^-22)` with room to spare.
"""

from __future__ import annotations

import pytest
import torch
from test_window import decode_model

from attnkit.cache import CacheFull, ContiguousCache
from attnkit.cache.quantized import QuantizedCache, dequantize, quantize
from attnkit.ops import cpu_decode
from models.test_llama import tiny

BOUND = (1 + 2**-22) / 254  # per element, relative to its row's absmax
LAYERS, KV_HEADS, DIM = 2, 3, 16


def rows_of_every_magnitude(gen, batch, n):
    """K/V rows whose absmax spans 1e-3 .. 1e3, so a shared scale would fail the bound."""
    x = torch.randn(batch, KV_HEADS, n, DIM, generator=gen, dtype=torch.float64)
    exponent = torch.randint(-3, 4, (batch, KV_HEADS, n, 1), generator=gen)
    return x * 10.0**exponent


def absmax(x):
    return x.abs().amax(-1, keepdim=True)


def caches(**kwargs):
    args = dict(max_seqs=3, dtype=torch.float64) | kwargs
    return QuantizedCache(LAYERS, KV_HEADS, DIM, **args), ContiguousCache(
        LAYERS, KV_HEADS, DIM, **args
    )


def step_both(quant, plain, seqs, n, gen):
    """One step of random K/V through both caches; the views of every layer."""
    batch = len(seqs)
    quant.prepare(seqs, n)
    plain.prepare(seqs, n)
    views = []
    for layer in range(LAYERS):
        k, v = rows_of_every_magnitude(gen, batch, n), rows_of_every_magnitude(gen, batch, n)
        views.append((quant.update(layer, k, v), plain.update(layer, k, v)))
    return views


def assert_within_bound(quantized, exact):
    assert quantized.dtype == exact.dtype and quantized.shape == exact.shape
    assert ((quantized - exact).abs() <= BOUND * absmax(exact)).all()


def test_views_are_the_stored_int8_times_their_scales():
    gen = torch.Generator().manual_seed(0)
    quant, _ = caches()
    a, b = quant.add_sequence(), quant.add_sequence()
    quant.prepare([a], 5)
    for layer in range(LAYERS):
        quant.update(layer, *(rows_of_every_magnitude(gen, 1, 5) for _ in "kv"))
    quant.prepare([b, a], 2)  # ragged and in reverse slot order: a gathered view
    k, v = rows_of_every_magnitude(gen, 2, 2), rows_of_every_magnitude(gen, 2, 2)
    k_view, v_view = quant.update(1, k, v)
    assert quant.k.dtype == quant.v.dtype == torch.int8
    for row, (seq, n) in enumerate(((b, 2), (a, 7))):
        slot = quant._slot[seq]
        for view, data, scale in (
            (k_view, quant.k, quant.k_scale),
            (v_view, quant.v, quant.v_scale),
        ):
            by_hand = data[1, slot, :, :n].double() * scale[1, slot, :, :n].double().unsqueeze(-1)
            assert torch.equal(view[row, :, :n], by_hand)
    # The scale of each new row is its absmax / 127 (in float32); its int8 reaches +-127.
    stored = quant.k_scale[1, quant._slot[a], :, 5:7]
    assert torch.equal(stored, (absmax(k[1]).squeeze(-1) / 127).float())
    assert (quant.k[1, quant._slot[a], :, 5:7].abs().amax(-1) == 127).all()


def test_error_is_within_a_254th_of_the_row_absmax_and_is_reported():
    gen = torch.Generator().manual_seed(1)
    quant, plain = caches(max_seqs=1)
    seq = quant.add_sequence()
    plain.add_sequence()
    assert quant.quantization_error.max_rel == 0
    errors, rels = [], []
    for n in (40, 1, 17):
        for (k_q, v_q), (k, v) in step_both(quant, plain, [seq], n, gen):
            assert_within_bound(k_q, k)
            assert_within_bound(v_q, v)
            for got, want in ((k_q, k), (v_q, v)):  # this step's new rows only
                err = (got - want)[:, :, -n:].abs()
                errors.append(err.flatten())
                rels.append((err / absmax(want[:, :, -n:])).flatten())
    errors, rels = torch.cat(errors), torch.cat(rels)
    report = quant.quantization_error
    assert report.max_abs == pytest.approx(errors.max().item(), rel=1e-12)
    assert report.max_rel == pytest.approx(rels.max().item(), rel=1e-12)
    assert report.mean_rel == pytest.approx(rels.mean().item(), rel=1e-9)
    # Rounding errors spread over [-s/2, s/2]: over ~9k elements the worst is close to s/2.
    assert 0.9 / 254 < report.max_rel <= BOUND
    assert report.max_abs > 1  # rows of absmax ~1e3 lose whole units: absolute error misleads


def test_an_all_zero_row_stores_zeros_with_scale_zero():
    q, scale = quantize(torch.zeros(2, 3, 8, dtype=torch.float64))
    assert torch.equal(q, torch.zeros_like(q)) and torch.equal(scale, torch.zeros(2, 3))
    assert torch.equal(
        dequantize(q, scale, torch.float64), torch.zeros(2, 3, 8, dtype=torch.float64)
    )


def test_nbytes_is_int8_data_plus_float32_scales_by_hand():
    quant = QuantizedCache(LAYERS, KV_HEADS, DIM, max_seqs=2, initial_len=4, v_head_dim=8)
    seq = quant.add_sequence()

    def expected(capacity):
        tokens = LAYERS * 2 * KV_HEADS * capacity  # (layers, slots, heads, capacity)
        return tokens * DIM + tokens * 8 + 2 * tokens * 4  # int8 K, int8 V, two float32 scales

    assert quant.nbytes == expected(4)
    quant.prepare([seq], 5)  # grows to 8 positions
    k, v = torch.randn(1, KV_HEADS, 5, DIM), torch.randn(1, KV_HEADS, 5, 8)
    for layer in range(LAYERS):
        quant.update(layer, k, v)
    assert quant.capacity == 8 and quant.nbytes == expected(8)
    plain = ContiguousCache(LAYERS, KV_HEADS, DIM, max_seqs=2, initial_len=8, v_head_dim=8)
    assert plain.nbytes / quant.nbytes == pytest.approx((16 + 8) * 4 / (16 + 8 + 8))


def test_fork_truncate_free_and_growth_behave_like_the_contiguous_cache():
    gen = torch.Generator().manual_seed(2)
    quant, plain = caches(initial_len=4)  # small: the steps below force growth twice

    def both(method, *args):
        got, want = getattr(quant, method)(*args), getattr(plain, method)(*args)
        assert got == want
        return got

    def check(views):
        for (k_q, v_q), (k, v) in views:  # the quantized view is the round trip of the plain one
            assert torch.equal(k_q, dequantize(*quantize(k), torch.float64))
            assert torch.equal(v_q, dequantize(*quantize(v), torch.float64))

    a = both("add_sequence")
    check(step_both(quant, plain, [a], 6, gen))
    b = both("fork", a)
    check(step_both(quant, plain, [b], 3, gen))
    check(step_both(quant, plain, [a, b], 1, gen))  # the fork evolved apart; a is unchanged
    both("truncate", a, 4)
    check(step_both(quant, plain, [a], 3, gen))  # overwrites the rolled-back positions
    both("free", b)
    c = both("add_sequence")
    check(step_both(quant, plain, [c, a], 2, gen))  # reused slot, ragged batch
    for seq in (a, c):
        assert quant.length(seq) == plain.length(seq)
    assert quant.capacity == plain.capacity == 16


def test_fixed_capacity_fills_exactly_and_one_more_raises_without_change():
    gen = torch.Generator().manual_seed(3)
    quant, plain = caches(max_len=6, max_seqs=1)
    seq = quant.add_sequence()
    plain.add_sequence()
    step_both(quant, plain, [seq], 6, gen)  # exactly at the limit
    before = (quant.k.clone(), quant.k_scale.clone())
    with pytest.raises(CacheFull, match="needs 7 positions but max_len is 6"):
        quant.prepare([seq], 1)
    assert quant.length(seq) == 6
    assert torch.equal(quant.k, before[0]) and torch.equal(quant.k_scale, before[1])


class RoundTripCache(ContiguousCache):
    """Stores the int8 round trip of K/V in float64: what QuantizedCache reads back."""

    def update(self, layer, k, v):
        return super().update(layer, *(dequantize(*quantize(t), t.dtype) for t in (k, v)))


class NoisyCache(ContiguousCache):
    """Adds uniform noise of the rounding error's size, +-absmax/254, to every stored row."""

    gen = torch.Generator().manual_seed(4)

    def update(self, layer, k, v):
        def noisy(t):
            noise = torch.rand(t.shape, generator=self.gen, dtype=t.dtype) * 2 - 1
            return t + noise * absmax(t) / 254

        return super().update(layer, noisy(k), noisy(v))


@torch.no_grad()
def test_model_logits_through_the_int8_cache():
    model = tiny()  # 3 layers, 3 KV heads of 6 dims, float64
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))

    def decode(cache_type, chunks):
        cache = cache_type(3, 3, 6, max_seqs=2, dtype=torch.float64)
        return decode_model(model, cache, ids, chunks), cache

    float_logits = model(ids)
    int8_logits, cache = decode(QuantizedCache, [10, 4, 6])
    # Exactly the model run on round-tripped K/V: the cache adds nothing but the rounding.
    assert (int8_logits - decode(RoundTripCache, [20])[0]).abs().max() < 1e-12
    assert 0 < cache.quantization_error.max_rel <= BOUND
    # How close to float: calibrated, not guessed. Rounding errors are spread over
    # +-absmax/254 per element; the same amount of uniform noise moves the logits by
    # `noise_err`, and the int8 cache must not do more than twice that (the 2x rule).
    noise_err = (decode(NoisyCache, [20])[0] - float_logits).abs().max()
    int8_err = (int8_logits - float_logits).abs().max()
    assert 0 < int8_err <= 2 * noise_err
    assert int8_logits.argmax(-1).eq(float_logits.argmax(-1)).float().mean() > 0.9


@torch.no_grad()
def test_float32_decode_reads_the_int8_rows_in_place(monkeypatch):
    # Decode steps in float32 through `attend` (layer by layer; the stacked step is
    # test_stacked_decode's) go to the C++ kernel with the int8 views and their scales
    # (no dequantized copy of the history); the logits are the float64 model's on the
    # round-tripped K/V within the 2x rule (twice the plain float32 path's error + 1e-5).
    calls, decode = [], cpu_decode.decode_contiguous

    def spy(q, k, v, *args, scales=None, **kwargs):
        calls.append((k.dtype, scales is not None))
        return decode(q, k, v, *args, scales=scales, **kwargs)

    monkeypatch.setattr(cpu_decode, "decode_contiguous", spy)
    model = tiny()  # float64
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(2))
    chunks = [12] + [1] * 8

    def run(m, cache_type, dtype):
        return decode_model(m, cache_type(3, 3, 6, max_seqs=2, dtype=dtype), ids, chunks)

    want = run(model, RoundTripCache, torch.float64)
    calls.clear()
    model.float()._stacked_decode = lambda *args: None  # layer by layer, through `attend`
    got = run(model, QuantizedCache, torch.float32)
    assert calls == [(torch.int8, True)] * (3 * 8)  # every layer of every decode step
    plain = run(model, RoundTripCache, torch.float32)  # the float32 model, float32 views
    err, plain_err = ((t.double() - want).abs().max() for t in (got, plain))
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dtype=torch.int8), "dtype must be a floating-point torch dtype, got torch.int8"),
        (dict(scale_dtype="float32"), "scale_dtype must be a floating-point torch dtype"),
        (dict(head_dim=0), "head_dim must be an integer >= 1, got 0"),
        (dict(max_len=0), "max_len must be an integer >= 1, got 0"),
    ],
    ids=["dtype-int8", "scale_dtype-str", "head_dim-0", "max_len-0"],
)
def test_bad_arguments_raise_with_the_value(kwargs, message):
    args = dict(n_layers=1, kv_heads=1, head_dim=4) | kwargs
    with pytest.raises(ValueError, match=message):
        QuantizedCache(**args)


def test_update_with_the_wrong_shape_raises_and_records_no_error():
    quant = QuantizedCache(1, 2, 4)
    seq = quant.add_sequence()
    quant.prepare([seq], 3)
    with pytest.raises(ValueError, match=r"k must be \(batch=1, kv_heads, n_new=3, head_dim\)"):
        quant.update(0, torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))
    assert quant.quantization_error.max_abs == 0
