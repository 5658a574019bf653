"""The decode-sized matmul kernels (row-major and packed) equal F.linear, the packed copy
follows its weight, and everything the kernels do not serve falls back.

Tolerance: float32 products of length `in` summed in a different order than BLAS; the error
against float64 must stay, per element, within 2x plain float32 F.linear's own error plus
8 float32 ulps at the size of that element's terms (`_assert_like_f_linear`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.layers.projection import Linear
from attnkit.ops import skinny_linear
from attnkit.ops.cpp_build import load_kernel, unavailable_reason

KERNELS = ("row-major", "packed")


@pytest.mark.parametrize("source", [skinny_linear.SOURCE, skinny_linear.PACKED_SOURCE])
def test_the_kernels_build_on_this_machine(source):
    # CI machines have a C++ compiler; if this fails, every fast path below silently falls
    # back to F.linear, so say so loudly here.
    assert load_kernel(source) is not None, unavailable_reason(source)


def _kernel_call(kernel: str, x, w, b):
    """The kernel itself, no dispatch."""
    if kernel == "row-major":
        return load_kernel(skinny_linear.SOURCE).skinny_linear(x, w, b)
    module = load_kernel(skinny_linear.PACKED_SOURCE)
    return module.packed_linear_many(x, [module.pack(w)], [w.shape[0]], [b])[0]


def _assert_like_f_linear(got, x, w, b=None) -> None:
    """`got` is F.linear(x, w, b) as float32 sums can give it: per element, within twice
    F.linear's worst error plus 8 ulps at the size of that element's terms, not of its
    result (an output that cancels to near 0 carries the rounding of its large terms:
    weights scaled 6^4-fold, 2e-5 on an output of 1.6 with terms of ~1e4)."""
    xd, wd, bd = x.double(), w.double(), None if b is None else b.double()
    want = F.linear(xd, wd, bd)
    terms = F.linear(xd.abs(), wd.abs(), None if bd is None else bd.abs())
    plain_err = (F.linear(x, w, b).double() - want).abs().max().item() if want.numel() else 0.0
    err = (got.double() - want).abs()
    floor = 8 * torch.finfo(torch.float32).eps * terms
    bad = err > 2 * plain_err + floor
    assert not bad.any(), (err[bad].max().item(), plain_err, floor[bad].min().item())


def _check(kernel: str, rows: int, n_in: int, n_out: int, with_bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=gen)
    w = torch.randn(n_out, n_in, generator=gen)
    b = torch.randn(n_out, generator=gen) if with_bias else None
    _assert_like_f_linear(_kernel_call(kernel, x, w, b), x, w, b)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, skinny_linear.MAX_ROWS),
    n_in=st.integers(1, 70),
    n_out=st.integers(1, 41),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
    kernel=st.sampled_from(KERNELS),
)
def test_kernels_match_float64_reference(rows, n_in, n_out, with_bias, seed, kernel):
    _check(kernel, rows, n_in, n_out, with_bias, seed)


@pytest.mark.parametrize(
    ("rows", "n_in"),
    [
        (33, 576),  # one row block: the tiles of 12, 8, 4, 2 and 1 rows (33 = 2*12 + 8 + 1)
        (171, 1536),  # 2 row blocks of 86 (at most 168 rows of 1536 floats in 1 MiB)
        (700, 1536),  # 5 blocks of 140: more blocks than threads, not a multiple of them
    ],
)
def test_packed_kernel_on_prefill_rows(rows, n_in):
    # Prefill-sized inputs take the packed kernel in blocks of rows (X_BLOCK_BYTES of x each),
    # every block against every panel; the feature count leaves the last panel padded.
    _check("packed", rows, n_in, 70, with_bias=True, seed=rows)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("n_in", "n_out"), [(576, 1536), (1536, 576), (576, 49152)])
@pytest.mark.parametrize("rows", [3, 32])
def test_kernels_on_model_sized_weights(rows, n_in, n_out, kernel):
    _check(kernel, rows, n_in, n_out, with_bias=True, seed=n_out)


def test_packed_many_serves_several_weights_in_one_call():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 40, generator=gen)
    weights = [torch.randn(n, 40, generator=gen) for n in (33, 1, 64)]
    biases = [torch.randn(33, generator=gen), None, torch.randn(64, generator=gen)]
    module = load_kernel(skinny_linear.PACKED_SOURCE)
    packed = [module.pack(w) for w in weights]
    outs = module.packed_linear_many(x, packed, [w.shape[0] for w in weights], biases)
    for out, w, b in zip(outs, weights, biases, strict=True):
        _assert_like_f_linear(out, x, w, b)


def test_packed_copy_is_kept_and_follows_its_weight():
    module = load_kernel(skinny_linear.PACKED_SOURCE)
    w = torch.nn.Parameter(torch.randn(40, 24))
    x = torch.randn(3, 24)
    with torch.no_grad():
        first = skinny_linear.packed_weight(w, module)
        assert skinny_linear.packed_weight(w, module) is first  # packed once
        _assert_like_f_linear(skinny_linear.linear(x, w), x, w)
        w.mul_(2)  # an in-place write (load_state_dict does this): repacked
        assert skinny_linear.packed_weight(w, module) is not first
        _assert_like_f_linear(skinny_linear.linear(x, w), x, w)
        w.data = torch.randn(40, 24)  # new storage: repacked
        _assert_like_f_linear(skinny_linear.linear(x, w), x, w)
        for _ in range(4):  # data replaced twice between calls: the second new tensor
            w.data = w.data * -2  # could reuse the packed data's address were the packing
            w.data = w.data * 3  # not holding that data
            _assert_like_f_linear(skinny_linear.linear(x, w), x, w)


def test_inference_mode_weights_take_the_packed_kernel(monkeypatch):
    # a model loaded under inference_mode has inference-tensor weights (no version counter)
    with torch.inference_mode():
        w, x = torch.randn(40, 24), torch.randn(2, 24)
        assert w.is_inference() and skinny_linear._kernel_applies(x, w, None)
        _assert_like_f_linear(skinny_linear.linear(x, w), x, w)
        assert hasattr(w, "_attnkit_packed")
        w2 = torch.randn(40, 24)
        w.data = w2  # new data: repacked
        _assert_like_f_linear(skinny_linear.linear(x, w), x, w2)


def test_packed_kernel_rejects_a_mismatched_packing():
    module = load_kernel(skinny_linear.PACKED_SOURCE)
    packed = module.pack(torch.randn(8, 16))
    panel = 2 * module.VECTOR_BYTES // 4  # two vectors of float32: 32 with AVX-512, 16 with AVX2
    assert packed.shape == (1, 16, panel)
    wanted = rf"a packed weight must be \(panels, 12, {panel}\) float32 for 8 features"
    with pytest.raises(RuntimeError, match=wanted):
        module.packed_linear_many(torch.randn(2, 12), [packed], [8], [None])


@pytest.mark.parametrize("packed", [True, False])
def test_dispatch_uses_the_kernel_for_decode_rows(packed, monkeypatch):
    calls = []
    row_major = load_kernel(skinny_linear.SOURCE)
    packing = load_kernel(skinny_linear.PACKED_SOURCE)
    monkeypatch.setenv("ATTNKIT_PACKED_WEIGHTS", "1" if packed else "0")

    class Spy:
        def skinny_linear_many(self, *args):
            calls.append(("row-major", args[0].shape))
            return row_major.skinny_linear_many(*args)

        def packed_linear_many(self, *args):
            calls.append(("packed", args[0].shape))
            return packing.packed_linear_many(*args)

        def pack(self, w):
            return packing.pack(w)

    kind = "packed" if packed else "row-major"
    monkeypatch.setattr(skinny_linear, "load_kernel", lambda source: Spy())
    monkeypatch.setattr(skinny_linear, "_packed_wins", lambda *args: True)  # at prefill rows
    layer = Linear(24, 10)
    x = torch.randn(2, 3, 24)  # 6 rows: the kernel's
    with torch.no_grad():
        out = layer(x)
        assert calls == [(kind, torch.Size([6, 24]))] and out.shape == (2, 3, 10)
        _assert_like_f_linear(out, x, layer.weight, layer.bias)
        layer(torch.randn(skinny_linear.MAX_ROWS + 1, 24))  # a prefill's rows
        layer(torch.randn(2, 24, dtype=torch.float64).float().T.contiguous().T)  # strided x
    # a strided x is made contiguous for the kernel; past MAX_ROWS rows only the packed
    # kernel serves (the row-major one is for decode steps), else BLAS
    many = [(kind, torch.Size([skinny_linear.MAX_ROWS + 1, 24]))] if packed else []
    assert calls[1:] == [*many, (kind, torch.Size([2, 24]))]
    n = len(calls)
    layer(torch.randn(1, 24))  # autograd on: F.linear, which has a backward
    assert len(calls) == n


def test_prefill_rows_go_to_whichever_of_kernel_and_blas_timed_faster(monkeypatch):
    # a fake clock: the packed call takes `packed_s`, F.linear 2 s
    clock = [0.0]

    class Blas:
        @staticmethod
        def linear(x, w, b=None):
            clock[0] += 2.0
            return F.linear(x, w, b)

    monkeypatch.setattr(skinny_linear, "F", Blas)
    monkeypatch.setattr(skinny_linear.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(skinny_linear, "_PREFILL_WINNER", {})
    w = torch.randn(8, 16)
    for rows, packed_s, want in [(40, 1.0, True), (100, 3.0, False)]:
        calls = []

        def packed_call(packed_s=packed_s, calls=calls):
            calls.append(1)
            clock[0] += packed_s

        x = torch.randn(rows, 16)
        assert skinny_linear._packed_wins(x, [w], [None], packed_call) is want
        assert len(calls) == 3  # a warm-up, then two timed runs
        # remembered for every call of this kind: row count of the same power of two
        again = torch.randn(rows + 3, 16)
        assert skinny_linear._packed_wins(again, [w], [None], packed_call) is want
        assert len(calls) == 3


@pytest.mark.parametrize("packed_wins", [True, False])
def test_prefill_rows_equal_f_linear_whichever_serves(packed_wins, monkeypatch):
    monkeypatch.setattr(skinny_linear, "_packed_wins", lambda *args: packed_wins)
    gen = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((2, 50, 24), (40, 24), (40,)))
    with torch.no_grad():
        out = skinny_linear.linear(x, w, b)
    if packed_wins:
        _assert_like_f_linear(out.view(-1, 40), x.view(-1, 24), w, b)
    else:
        torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=0)


@pytest.mark.parametrize(
    "case",
    ["grad", "float64", "strided weight", "too many rows", "disabled"],
)
def test_fallbacks_equal_f_linear(case, monkeypatch, request):
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 16, generator=gen), torch.randn(8, 16, generator=gen), None
    if case == "float64":
        x, w = x.double(), w.double()
    if case == "strided weight":
        w = torch.randn(16, 8, generator=gen).T
    if case == "too many rows":  # for the row-major kernel (the packed one is off)
        x = torch.randn(skinny_linear.MAX_ROWS + 1, 16, generator=gen)
        monkeypatch.setenv("ATTNKIT_PACKED_WEIGHTS", "0")
    if case == "disabled":
        request.getfixturevalue("cpp_switched_off")
    if case == "grad":
        w.requires_grad_(True)
        out = skinny_linear.linear(x, w, b)
        assert out.requires_grad  # went through F.linear
    elif case == "disabled":
        for source in (skinny_linear.SOURCE, skinny_linear.PACKED_SOURCE):
            assert load_kernel(source) is None
            assert "ATTNKIT_NO_CPP" in unavailable_reason(source)
        out = skinny_linear.linear(x, w, b)
    elif case == "too many rows":
        assert skinny_linear._kernel_outputs(x, [w], [b]) is None
        out = skinny_linear.linear(x, w, b)
    else:
        assert not skinny_linear._kernel_applies(x, w, b)
        out = skinny_linear.linear(x, w, b)
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=0, atol=0)


def test_shape_mismatch_gives_torch_s_error_not_a_crash():
    with torch.no_grad(), pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        skinny_linear.linear(torch.randn(1, 5), torch.randn(3, 4))


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    layer = Linear(4, 3)
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
