"""The banded causal / sliding-window kernel against the float64 reference, and where it
declines.

Tolerance: float32 scores of length-d dot products and an online softmax over at most
W + S keys (n_k when causal), with a polynomial exp (Cephes' exp2f, ~1 ulp): within 2e-5
of the float64 reference for unit-normal inputs (measured ~1e-6).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnkit
from attnkit import masks
from attnkit.ops.backends.banded import SOURCE, BandedBackend
from attnkit.ops.cpp_build import load_kernel, unavailable_reason
from attnkit.ops.problem import make_problem

TOL = 2e-5


def test_the_kernel_builds_on_this_machine():
    assert load_kernel(SOURCE) is not None, unavailable_reason(SOURCE)


def _inputs(seed, batch, heads, kv_heads, n_q, n_k, d, dv):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, n_q, d, generator=gen)
    k = torch.randn(batch, kv_heads, n_k, d, generator=gen)
    v = torch.randn(batch, kv_heads, n_k, dv, generator=gen)
    return q, k, v


def _check(q, k, v, mask, backend, q_offset=None, scale=None):
    with torch.no_grad():
        got = attnkit.attention(q, k, v, mask, backend=backend, q_offset=q_offset, scale=scale)
    want = attnkit.attention(
        q.double(),
        k.double(),
        v.double(),
        mask,
        backend="reference",
        q_offset=q_offset,
        scale=scale,
    )
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got.double() - want).abs().max().item() <= TOL


@settings(max_examples=60, deadline=None)
@given(
    n_k=st.integers(1, 300),
    prefix=st.integers(0, 300),  # keys before the first query (chunked prefill)
    window=st.integers(1, 80),
    n_sinks=st.sampled_from([0, 1, 4, 6, 17, 40]),  # in one to four pieces of 12 keys
    # query heads per KV head: a block's 32 query lanes (AVX2: 16) hold 32 // group
    # positions (3 and 12 leave spare lanes; 40 heads take two blocks per position, AVX2 3)
    group=st.sampled_from([1, 2, 3, 4, 12, 40]),
    kv_heads=st.integers(1, 2),
    dims=st.sampled_from([(16, 16), (8, 24), (33, 7)]),
    tile=st.sampled_from([1, 5, 32]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_reference(n_k, prefix, window, n_sinks, group, kv_heads, dims, tile, seed):
    n_q = max(1, n_k - prefix)
    q, k, v = _inputs(seed, 2, group * kv_heads, kv_heads, n_q, n_k, *dims)
    mask = masks.sliding_window(window)
    if n_sinks:
        mask = mask | masks.sinks(n_sinks)
    _check(q, k, v, mask, BandedBackend(tile))


@settings(max_examples=40, deadline=None)
@given(
    n_k=st.integers(2, 700),  # up to three 256-key chunks, several groups of 16 blocks
    prefix=st.integers(0, 400),
    group=st.sampled_from([1, 3, 4, 12, 40]),
    batch_and_kv_heads=st.sampled_from([(1, 1), (2, 2)]),
    dims=st.sampled_from([(16, 16), (33, 7), (64, 64)]),
    tile=st.sampled_from([1, 5, 32]),
    # scores 4x the usual size make the softmax peaky: a wrong rescale between chunks would
    # show (larger ones take float32 scores' rounding past TOL, torch SDPA's as well)
    sharpness=st.sampled_from([1, 4]),
    seed=st.integers(0, 2**16),
)
def test_causal_matches_the_reference(
    n_k, prefix, group, batch_and_kv_heads, dims, tile, sharpness, seed
):
    n_q = max(2, n_k - prefix)  # one row at the end sees every key: no mask, no kernel
    batch, kv_heads = batch_and_kv_heads
    q, k, v = _inputs(seed, batch, group * kv_heads, kv_heads, n_q, n_k, *dims)
    scale = sharpness / math.sqrt(dims[0])
    _check(q, k, v, masks.causal(), BandedBackend(tile), scale=scale)


def test_online_softmax_rescales_when_a_later_chunk_holds_the_max():
    """Row maxima that grow chunk after chunk (and one that sits in the first chunk): each
    chunk's weights must be rescaled to the final max, else the output is off by e^gap."""
    n = 900
    q, k, v = _inputs(6, 1, 4, 2, n, n, 16, 16)
    k = k * torch.linspace(0.1, 3.0, n).view(1, 1, n, 1)  # later keys score larger
    k[:, :, 3] = q[:, ::2, -1] * 4  # one early key far above the rest for the last rows
    for mask in (
        masks.causal(),
        masks.sliding_window(700),
        masks.sliding_window(600) | masks.sinks(5),
    ):
        _check(q, k, v, mask, "banded")


@pytest.mark.parametrize("window", [3, 20, 200])
def test_rows_that_see_no_key_of_a_chunk_yet(window):
    """A group's first key chunk can hold none of a later block's window: those lanes' max
    stays -inf until a later chunk, and their weights must come out 0, not exp(-inf + inf)."""
    q, k, v = _inputs(7, 1, 1, 1, 600, 600, 16, 16)
    _check(q, k, v, masks.sliding_window(window), BandedBackend(32))


def test_sinks_on_either_side_an_explicit_offset_and_scale():
    q, k, v = _inputs(1, 1, 6, 3, 40, 100, 16, 16)
    for mask in (
        masks.sinks(3) | masks.sliding_window(9),
        masks.sliding_window(9) | masks.sinks(3),
    ):
        _check(q, k, v, mask, "banded", q_offset=25, scale=0.3)


def test_model_sized_window_and_causal_through_auto():
    q, k, v = _inputs(2, 1, 8, 2, 1500, 1500, 64, 64)
    for mask in (
        masks.sliding_window(512),
        masks.sliding_window(512) | masks.sinks(4),
        masks.causal(),
    ):
        _check(q, k, v, mask, "auto")
    _check(q[:, :, 1000:], k, v, masks.causal(), "auto")  # a prefill chunk after a cache


@pytest.mark.parametrize("tile", [1, 5, 32])
@pytest.mark.parametrize(
    ("mask", "n_q", "n_k", "q_offset"),
    [
        (masks.sliding_window(8), 5, 40, 35),  # a decode-sized chunk after a long prefix
        (masks.sliding_window(3), 20, 120, 100),  # most keys hidden from every block
        (masks.sliding_window(3) | masks.sinks(4), 20, 60, 40),  # hidden keys between sinks
        (masks.causal(), 5, 40, 10),  # keys after the last query (at position 14)
    ],
)
def test_nan_in_keys_no_query_sees_does_not_leak(mask, n_q, n_k, q_offset, tile):
    """Keys outside every query's window and sinks must not reach the arithmetic (a NaN
    there would come through 0 · NaN in the product with V), whatever the tiling."""
    q, k, v = _inputs(4, 1, 4, 2, n_q, n_k, 16, 16)
    backend = BandedBackend(tile)
    with torch.no_grad():
        clean = attnkit.attention(q, k, v, mask, q_offset=q_offset, backend=backend)
        seen = mask.dense(n_q, n_k, q_offset)[0, 0].any(0)
        k_bad, v_bad = k.clone(), v.clone()
        k_bad[:, :, ~seen], v_bad[:, :, ~seen] = math.nan, math.inf
        assert (~seen).sum() >= n_k // 2
        dirty = attnkit.attention(q, k_bad, v_bad, mask, q_offset=q_offset, backend=backend)
    assert torch.equal(clean, dirty) and not clean.isnan().any()


def test_windows_and_sinks_past_the_sequence_are_clamped_not_allocated():
    """sliding_window(2**63 - 1) means "no limit"; the kernel's scratch is sized by n_k."""
    q, k, v = _inputs(5, 1, 4, 2, 50, 50, 16, 16)
    for mask in (
        masks.sliding_window(2**63 - 1),
        masks.sliding_window(7) | masks.sinks(2**62),
        masks.sliding_window(2**63 - 1) | masks.sinks(2**62),
    ):
        _check(q, k, v, mask, "banded")
    module = load_kernel(SOURCE)
    with torch.no_grad():
        huge_tile = module.banded_attention(q, k, v, 7, 0, 0, 0.25, 2**62)
        small_tile = module.banded_attention(q, k, v, 7, 0, 0, 0.25, 50)
    assert torch.equal(huge_tile, small_tile)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mask": masks.causal() & masks.strided(3)}, "serves causal() and sliding_window"),
        ({"mask": masks.sliding_window(4) & masks.causal()}, "serves causal() and sliding"),
        ({"mask": masks.sliding_window(4) | masks.strided(3)}, "serves causal() and sliding"),
        ({"mask": None}, "serves causal() and sliding_window"),
        ({"return_lse": True}, "no log-sum-exp"),
        ({"softcap": 5.0}, "no softcap"),
        ({"dtype": torch.float64}, "float32 CPU"),
        ({"q_offset": 20}, "query rows must sit at key positions"),
        ({"q_offset": -1}, "query rows must sit at key positions"),
    ],
)
def test_declines_what_it_cannot_serve(change, reason):
    q, k, v = _inputs(3, 1, 4, 2, 8, 24, 8, 8)
    dtype = change.pop("dtype", torch.float32)
    args = {"mask": masks.sliding_window(4), "scale": None, "softcap": None, "q_offset": None}
    args |= {"return_lse": False} | change
    problem = make_problem(*(t.to(dtype) for t in (q, k, v)), **args)
    assert reason in BandedBackend().unsupported(problem)
    with pytest.raises(ValueError, match=f"backend 'banded' cannot serve.*{re.escape(reason)}"):
        attnkit.attention(*(t.to(dtype) for t in (q, k, v)), backend="banded", **args)


def test_gradients_are_declined_not_dropped():
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="has no backward, but an input requires grad"):
        attnkit.attention(q, q, q, masks.sliding_window(3), backend="banded")
    out = attnkit.attention(q, q, q, masks.sliding_window(3))  # auto: a backend with backward
    out.sum().backward()
    assert q.grad is not None


def test_the_kernel_names_bad_arguments():
    module = load_kernel(SOURCE)
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="window >= 1, sinks >= 0, tile >= 1, got 0, 0, 32"):
        module.banded_attention(q, q, q, 0, 0, 0, 1.0, 32)
    with pytest.raises(RuntimeError, match="contiguous 4-D float32 CPU tensors"):
        module.banded_attention(q.double(), q, q, 4, 0, 0, 1.0, 32)
    with pytest.raises(RuntimeError, match="0 <= q_offset and q_offset \\+ n_q <= n_k"):
        module.banded_attention(q, q, q, 4, 0, 1, 1.0, 32)
    with pytest.raises(RuntimeError, match="0 <= q_offset and q_offset \\+ n_q <= n_k"):
        module.banded_attention(q, q, q, 4, 0, 2**63 - 1, 1.0, 32)  # q_offset + n_q overflows
    with pytest.raises(RuntimeError, match="with H > 0 and H % Hkv == 0"):
        module.banded_attention(torch.randn(1, 0, 4, 8), q, q, 4, 0, 0, 1.0, 32)


def test_bad_tile_is_named():
    with pytest.raises(ValueError, match="tile must be an integer >= 1, got 0"):
        BandedBackend(0)
