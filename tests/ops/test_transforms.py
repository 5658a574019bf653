"""Forward-mode AD and `torch.func` transforms through attnkit's fast paths (ops/transforms.py).

The C++ kernels have no derivatives and read raw storage, and torch's fused SDPA kernels have
no forward-mode AD: under `forward_ad.dual_level`, `torch.func.jvp`, `vmap` or `grad`, every
call takes plain torch ops and gives the derivatives the float64 definition gives.

Oracle: a central finite difference in float64 of the call's values outside any transform
(attention: the `reference` backend's), step 1e-6: truncation ~1e-12, rounding ~1e-10.
Tolerances: float64 tangents within 1e-7 of it; float32 tangents within 2e-5 (float32
rounding of values ~1, summed over a few dozen keys; the 8 heads' tangents are ~1-10);
vmap against a loop of the same float32 calls within 1e-6.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jvp, vmap

from attn_testing import random_qkv, tiny_transformer
from attnkit.ops.attention import attention
from attnkit.ops.decode_attention import decode_attention
from attnkit.ops.masks import causal, chunked, sinks, sliding_window
from attnkit.ops.paged_decode import choose_paged_backend, paged_decode
from attnkit.ops.rms_norm import rms_norm
from attnkit.ops.skinny_linear import linear
from attnkit.ops.transforms import kernel_refusal, transform_active

# torch.func.jvp's first use scripts torch's own decompositions, which torch 2.13 warns of
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

STEP = 1e-6
TOL = {torch.float64: 1e-7, torch.float32: 2e-5}

# (n_q, n_k, mask): a decode row (the short way), a decode row over a window, a causal
# prefill (SDPA or the banded kernel), a window with sinks (the banded kernel), and a sparse
# mask big enough for `gathered` (1M pairs, a quarter of the tiles).
CASES = {
    "decode": (1, 37, None),
    "decode window": (1, 37, sliding_window(8)),
    "causal prefill": (40, 40, causal()),
    "window and sinks": (40, 40, sliding_window(8) | sinks(2)),
    "chunked (gathered)": (1024, 1024, chunked(256)),
}


def finite_difference(f, inputs, tangents):
    """(f(x + h·t) - f(x - h·t)) / 2h for each output of f, in float64."""
    wide = [x.double() for x in inputs]
    up = f(*(x + STEP * t.double() for x, t in zip(wide, tangents, strict=True)))
    down = f(*(x - STEP * t.double() for x, t in zip(wide, tangents, strict=True)))
    if isinstance(up, torch.Tensor):
        return (up - down) / (2 * STEP)
    return tuple((a - b) / (2 * STEP) for a, b in zip(up, down, strict=True))


def test_transform_active_only_inside_a_transform():
    x = torch.ones(2)
    seen = []

    def note(y):
        seen.append(transform_active())
        return y

    assert not transform_active()
    with fwAD.dual_level():
        assert transform_active()
    vmap(note)(x)
    jvp(note, (x,), (x,))
    grad(lambda y: note(y).sum())(x)
    assert seen == [True, True, True]
    assert not transform_active() and kernel_refusal("the kernel", x) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_attention_tangents_match_finite_differences(case, dtype):
    n_q, n_k, mask = CASES[case]
    gen = torch.Generator().manual_seed(len(case))
    q, k, v = random_qkv(gen, batch=2, heads=8, kv_heads=2, n_q=n_q, n_k=n_k, dtype=dtype)
    tangents = random_qkv(gen, batch=2, heads=8, kv_heads=2, n_q=n_q, n_k=n_k, dtype=dtype)

    _, tangent = jvp(lambda *x: attention(*x, mask), (q, k, v), tangents)

    want = finite_difference(
        lambda *x: attention(*x, mask, backend="reference"), (q, k, v), tangents
    )
    assert tangent.dtype == dtype and tangent.abs().max() > 0.1
    torch.testing.assert_close(tangent.double(), want, rtol=0, atol=TOL[dtype])


def test_dual_tensors_keep_their_tangents_through_the_decode_short_way_and_lse():
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen, batch=3, heads=8, kv_heads=2, n_q=1, n_k=50)
    tq, tk, tv = random_qkv(gen, batch=3, heads=8, kv_heads=2, n_q=1, n_k=50)

    with fwAD.dual_level():
        duals = (fwAD.make_dual(q, tq), fwAD.make_dual(k, tk), fwAD.make_dual(v, tv))
        out, lse = attention(*duals, return_lse=True)
        got = (fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(lse).tangent)

    want = finite_difference(
        lambda *x: attention(*x, backend="reference", return_lse=True), (q, k, v), (tq, tk, tv)
    )
    for g, w in zip(got, want, strict=True):
        assert g is not None  # dropped by the C++ kernel before transforms were asked about
        torch.testing.assert_close(g.double(), w, rtol=0, atol=TOL[torch.float32])


@pytest.mark.parametrize("shared_q", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_vmap_over_an_extra_dim_equals_a_loop(case, shared_q):
    n_q, n_k, mask = CASES[case]
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, batch=6, heads=8, kv_heads=2, n_q=n_q, n_k=n_k)
    q, k, v = (x.unflatten(0, (3, 2)) for x in (q, k, v))  # 3 problems of batch 2
    q = q[0] if shared_q else q  # then only k and v are batched by vmap

    def call(q, k, v):
        return attention(q, k, v, mask, return_lse=True)

    got = vmap(call, in_dims=(None if shared_q else 0, 0, 0))(q, k, v)

    loop = [call(q if shared_q else q[i], k[i], v[i]) for i in range(3)]
    for g, w in zip(got, zip(*loop, strict=True), strict=True):
        torch.testing.assert_close(g, torch.stack(w), rtol=0, atol=1e-6)


def test_func_grad_of_a_decode_call_matches_autograd_on_the_reference():
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(gen, batch=2, heads=8, kv_heads=2, n_q=1, n_k=30, dtype=torch.float64)

    got = grad(lambda k: attention(q, k, v).square().sum())(k)

    k_ref = k.clone().requires_grad_()
    attention(q, k_ref, v, backend="reference").square().sum().backward()
    torch.testing.assert_close(got, k_ref.grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_paged_and_decode_attention_tangents_match_finite_differences(dtype):
    gen = torch.Generator().manual_seed(11)
    lengths = torch.tensor([5, 33, 16])
    table = torch.tensor([[7, -1, -1], [2, 0, 5], [4, -1, -1]])  # 16-token blocks, shuffled
    pools = [torch.randn(8, 16, 2, 32, generator=gen, dtype=torch.float64) for _ in range(2)]
    q = torch.randn(3, 8, 32, generator=gen, dtype=torch.float64)
    inputs = [x.to(dtype) for x in (q, *pools)]
    tangents = [torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype) for x in inputs]

    def paged(q, k, v):
        return paged_decode(q, k, v, table, lengths, return_lse=True)

    def contiguous(q, k, v):  # the same keys, gathered into a (batch, kv_heads, n, d) cache
        gathered = [x[table.clamp(min=0)].flatten(1, 2).transpose(1, 2) for x in (k, v)]
        return decode_attention(q, *gathered, lengths, return_lse=True)

    for f in (paged, contiguous):
        _, got = jvp(f, tuple(inputs), tuple(tangents))
        want = finite_difference(f, inputs, tangents)
        for g, w in zip(got, want, strict=True):
            assert g.abs().max() > 0.1
            torch.testing.assert_close(g.double(), w, rtol=0, atol=TOL[dtype])


def test_vmap_of_paged_decode_over_queries_equals_a_loop():
    gen = torch.Generator().manual_seed(13)
    k_pool, v_pool = (torch.randn(6, 16, 2, 32, generator=gen) for _ in range(2))
    table, lengths = torch.tensor([[3, 1], [5, -1]]), torch.tensor([20, 9])
    queries = torch.randn(4, 2, 8, 32, generator=gen)

    got = vmap(lambda q: paged_decode(q, k_pool, v_pool, table, lengths))(queries)

    want = torch.stack([paged_decode(q, k_pool, v_pool, table, lengths) for q in queries])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_rms_norm_and_linear_tangents_in_float32_match_finite_differences():
    gen = torch.Generator().manual_seed(17)
    x, weight = torch.randn(3, 64, generator=gen), torch.randn(64, generator=gen)
    matrix = torch.randn(48, 64, generator=gen)
    tangents = [torch.randn(t.shape, generator=gen) for t in (x, weight, matrix)]

    def layer(x, weight, matrix):  # rms_norm's and the skinny linear's kernels take these
        return linear(rms_norm(x, weight, 1e-5), matrix)

    _, got = jvp(layer, (x, weight, matrix), tuple(tangents))

    want = finite_difference(layer, (x, weight, matrix), tangents)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)  # |tangent| ~ 50
    assert vmap(layer, in_dims=(0, None, None))(x.unsqueeze(1), weight, matrix).shape == (3, 1, 48)


def test_a_model_decoding_through_its_cache_under_jvp_matches_finite_differences():
    """Prefill and two decode steps of a float32 model (the fused decode block and the one-
    call decode step qualify outside transforms), the tangent of one weight's change."""
    model = tiny_transformer(3).float()
    wide = copy.deepcopy(model).double()
    name = "blocks.0.mlp.down.weight"
    weight = model.get_parameter(name).detach()
    tangent = torch.randn(weight.shape, generator=torch.Generator().manual_seed(19))

    def logits(w, m=model):
        with torch.no_grad():  # forward-mode AD needs no recording; the kernels' usual mode
            cache = m.new_cache(2)
            steps = [torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.tensor([[9], [10]])]
            steps.append(torch.tensor([[11], [12]]))
            return torch.cat(
                [functional_call(m, {name: w}, (s,), {"cache": cache}) for s in steps], 1
            )

    _, got = jvp(logits, (weight,), (tangent,))

    want = finite_difference(lambda w: logits(w, wide), [weight], [tangent])
    assert want.abs().max() > 1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "call",
    [
        lambda q, k, v: attention(q, k, v, backend="cpp_decode"),
        lambda q, k, v: attention(q, k, v, sliding_window(4), backend="banded"),
        lambda q, k, v: decode_attention(q, k, v, backend="cpp"),
        lambda q, k, v: attention(q, k, v, chunked(4), backend="gathered"),
    ],
)
def test_naming_a_kernel_inside_a_transform_says_why_it_cannot(call):
    q, k, v = random_qkv(torch.Generator().manual_seed(23), n_q=1, n_k=9)
    with fwAD.dual_level(), pytest.raises(ValueError, match="forward-mode AD or a torch.func"):
        call(fwAD.make_dual(q, torch.ones_like(q)), k, v)


def test_paged_decode_keeps_gradients_off_the_triton_kernel():
    """On CUDA `auto` takes the Triton kernel, which has no backward: with gradients wanted
    it gathers instead (asked of a CUDA-like q: no GPU here), and naming it raises."""
    k_pool, v_pool = torch.randn(4, 16, 2, 32), torch.randn(4, 16, 2, 32)
    on_cuda = SimpleNamespace(is_cuda=True, requires_grad=True)
    assert choose_paged_backend(on_cuda, k_pool, v_pool) == "torch"
    q = torch.randn(2, 8, 32, requires_grad=True)  # Triton's interpreter runs it on the CPU
    table, lengths = torch.tensor([[0, 1], [2, 3]]), torch.tensor([20, 32])
    with pytest.raises(ValueError, match="has no backward, but an input requires grad"):
        paged_decode(q, k_pool, v_pool, table, lengths, backend="triton")
    with torch.no_grad():  # no gradient recorded: the kernel serves it
        assert paged_decode(q, k_pool, v_pool, table, lengths, backend="triton").shape == (2, 8, 32)
