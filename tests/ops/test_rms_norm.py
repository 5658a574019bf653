"""RMSNorm's C++ kernel against a float64 reference, and the torch fallback for the rest.

Tolerance: a float32 sum of squares over `width` terms and two float32 products per
element; relative error within 1e-5 of the float64 result (measured ~3e-7).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.ops import rms_norm as norm_module
from attnkit.ops.cpp_build import load_kernel, unavailable_reason
from attnkit.ops.rms_norm import rms_norm


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def test_the_kernel_builds_on_this_machine():
    assert load_kernel(norm_module.SOURCE) is not None, unavailable_reason(norm_module.SOURCE)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 300),
    width=st.integers(1, 700),
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_float64_reference(rows, width, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen) * 3
    weight = torch.randn(width, generator=gen)
    got = load_kernel(norm_module.SOURCE).rms_norm(x, weight, eps).double()
    want = reference(x, weight, eps)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-7


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(2, 3, 64, generator=g),  # the kernel
        lambda g: torch.randn(64, 3, generator=g).T,  # not contiguous: copied, then the kernel
        lambda g: torch.randn(2, 64, generator=g, dtype=torch.float64),  # torch
        lambda g: torch.randn(2, 64, generator=g).requires_grad_(),  # autograd: torch
    ],
    ids=["float32", "strided", "float64", "grad"],
)
def test_every_input_kind_gives_the_same_answer(make):
    gen = torch.Generator().manual_seed(1)
    x = make(gen)
    weight = torch.randn(x.shape[-1], generator=gen, dtype=x.dtype)
    got = rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == x.dtype
    want = reference(x.detach(), weight, 1e-5)
    assert (got.detach().double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_float64_is_normalised_in_float64():
    """Not taken down to float32 as transformers' RMSNorm does (float64 models are the
    oracle of the float32 ones): within 1e-13 of the float64 formula, where a float32
    normalisation is ~1e-7 away."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 96, generator=gen, dtype=torch.float64) * 3
    weight = torch.randn(96, generator=gen, dtype=torch.float64)
    want = reference(x, weight, 1e-5)
    assert (rms_norm(x, weight, 1e-5) - want).abs().max() <= 1e-13 * want.abs().max()


def test_gradients_flow_through_the_fallback():
    x = torch.randn(3, 16, requires_grad=True)
    rms_norm(x, torch.ones(16), 1e-5).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_switched_off_kernels_use_torch(cpp_switched_off):
    x, weight = torch.randn(4, 32), torch.randn(32)
    want = reference(x, weight, 1e-5)
    assert (rms_norm(x, weight, 1e-5).double() - want).abs().max() <= 1e-5 * want.abs().max()


def test_a_weight_of_the_wrong_width_is_named():
    with pytest.raises(
        ValueError, match=r"weight must be \(64,\) to match x's last dim, got \(32,\)"
    ):
        rms_norm(torch.randn(2, 64), torch.ones(32), 1e-5)


def test_a_scalar_x_is_named():
    with pytest.raises(ValueError, match="x must have at least one dim .*got a scalar"):
        rms_norm(torch.tensor(1.0), torch.ones(1), 1e-5)
