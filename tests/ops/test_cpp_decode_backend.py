"""The `cpp_decode` attention backend equals the float64 reference for every mask at decode,
`auto` picks it for one query row on CPU, and it refuses what it cannot serve.

Tolerance: the 2x rule of `attn_testing.assert_matches_reference`.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_attention_backends import HEADS, MASK_NAMES, mask_cases, seed

import attnkit
from attn_testing import assert_matches_reference, random_qkv
from attnkit import masks
from attnkit.ops import attention as attention_module
from attnkit.ops import cpu_decode
from attnkit.ops.backends import get_backend, register
from attnkit.ops.backends.cpu_decode import CppDecodeBackend, plain_decode
from attnkit.ops.problem import make_problem


@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("n_k", [1, 97])
def test_matches_reference_for_every_mask(mask_name, n_k):
    gen = torch.Generator().manual_seed(seed("cpp_decode", mask_name, n_k))
    heads, kv_heads = list(HEADS.values())[seed(mask_name) % 3]
    q, k, v = random_qkv(gen, batch=3, heads=heads, kv_heads=kv_heads, n_q=1, n_k=n_k)
    mask = mask_cases(1, n_k, 3, gen)[mask_name]
    assert_matches_reference("cpp_decode", q, k, v, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
def test_dtypes_and_head_layouts(dtype, heads):
    gen = torch.Generator().manual_seed(seed(str(dtype), heads))
    n_heads, kv_heads = HEADS[heads]
    q, k, v = random_qkv(gen, 2, n_heads, kv_heads, n_q=1, n_k=300, head_dim=64, dtype=dtype)
    assert_matches_reference("cpp_decode", q, k, v, mask=masks.padding([300, 123]))


def test_reads_strided_cache_views_without_nan_from_unused_slots():
    # A cache buffer (batch, kv_heads, capacity, d) read as a view of its first 50 tokens,
    # with NaN in the slots past each sequence's length: they must not reach the output.
    gen = torch.Generator().manual_seed(3)
    q, k_buf, v_buf = random_qkv(gen, batch=2, heads=8, kv_heads=2, n_q=1, n_k=64, head_dim=32)
    lengths = [50, 17]
    for b, n in enumerate(lengths):
        k_buf[b, :, n:], v_buf[b, :, n:] = math.nan, math.nan
    k, v = k_buf[:, :, :50], v_buf[:, :, :50]
    assert not k.is_contiguous()
    got = attnkit.attention(q, k, v, masks.padding(lengths), backend="cpp_decode")
    clean_k, clean_v = (torch.nan_to_num(t, nan=0.0) for t in (k, v))
    want = attnkit.attention(q, clean_k, clean_v, masks.padding(lengths), backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_auto_picks_it_for_decode_on_cpu_and_not_for_prefill():
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(gen, n_q=1, n_k=40)
    decode = make_problem(q, k, v, None, None, None, None, False)
    assert attnkit.choose_backend(decode).name == "cpp_decode"
    q2, k2, v2 = random_qkv(gen, n_q=2, n_k=40)
    prefill = make_problem(q2, k2, v2, masks.causal(), None, None, None, False)
    assert attnkit.choose_backend(prefill).name != "cpp_decode"
    q.requires_grad_(True)  # training: the kernel has no backward
    with_grad = make_problem(q, k, v, None, None, None, None, False)
    assert attnkit.choose_backend(with_grad).name == "sdpa"


@pytest.mark.parametrize("q_offset", [None, 59, 30, 3, 0], ids=str)
@pytest.mark.parametrize(
    "mask",
    [
        masks.sliding_window(8),
        masks.sliding_window(8) | masks.sinks(2),
        masks.sinks(5) | masks.sliding_window(1),
        masks.sliding_window(200),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_windows_and_sinks_are_read_by_the_kernel_itself(mask, q_offset, dtype, monkeypatch):
    # The query at key position q_offset sees the window's last keys up to it (and the
    # sinks): the kernel reads those, with no torch kernel and no dense mask.
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, batch=3, heads=6, kv_heads=2, n_q=1, n_k=60, dtype=dtype)
    assert_matches_reference("cpp_decode", q, k, v, mask=mask, q_offset=q_offset)
    for name in ("sdpa", "tiled"):
        monkeypatch.setattr(get_backend(name), "run", lambda p: pytest.fail("torch ran"))
    attnkit.attention(q, k, v, mask, q_offset=q_offset)  # `auto` picks the kernel too


def test_a_mask_that_is_not_a_key_prefix_or_a_window_still_gives_the_reference_answer():
    # strided keys, a window beside key padding: the backend hands them to torch SDPA
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, n_q=1, n_k=60)
    padded_window = masks.sliding_window(8) & masks.padding([50])
    for mask in (masks.strided(3), padded_window):
        assert_matches_reference("cpp_decode", q, k, v, mask=mask)


@pytest.mark.parametrize(
    ("n_q", "softcap", "reason"),
    [(2, None, "one query row per sequence"), (1, 5.0, "no softcap"), (1, None, "no backward")],
)
def test_refuses_what_it_cannot_serve(n_q, softcap, reason):
    gen = torch.Generator().manual_seed(6)
    q, k, v = random_qkv(gen, n_q=n_q, n_k=10)
    q.requires_grad_(reason == "no backward")
    with pytest.raises(ValueError, match=reason):
        attnkit.attention(q, k, v, backend="cpp_decode", softcap=softcap)


def _without_the_full_path(monkeypatch):
    """Make `attention()`'s full path fail loudly, so an answer can only come from the
    short way `auto` takes for a plain decode call."""

    def full_path(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(attention_module, "make_problem", full_path)


@pytest.mark.parametrize("strided_cache", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
def test_a_plain_decode_call_takes_the_short_way_and_matches_the_reference(
    heads, dtype, strided_cache, monkeypatch
):
    # No mask, softcap or offset, one query row: `auto` calls the kernel without building a
    # problem (5 us a call hot, ~30 from cold caches). Same answer as the named backend (one
    # kernel, bitwise) and within the 2x rule of the float64 reference, out and lse, for
    # every head layout, v's head dim apart from q's, a custom scale and a cache view.
    gen = torch.Generator().manual_seed(seed("plain", heads, str(dtype), strided_cache))
    n_heads, kv_heads = HEADS[heads]
    n_k = 33
    q, k, v = random_qkv(gen, 3, n_heads, kv_heads, 1, n_k + 8, head_dim=24, v_head_dim=40)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    k, v = (
        (k[:, :, :n_k], v[:, :, :n_k])
        if strided_cache
        else (k[:, :, 8:].clone(), v[:, :, 8:].clone())
    )
    for scale in (None, 0.3):
        assert_matches_reference("cpp_decode", q, k, v, scale=scale)
        named = attnkit.attention(q, k, v, scale=scale, backend="cpp_decode", return_lse=True)
        with monkeypatch.context() as patch:
            _without_the_full_path(patch)
            short = attnkit.attention(q, k, v, scale=scale, return_lse=True)
            alone = attnkit.attention(q, k, v, scale=scale)
        assert torch.equal(short[0], named[0]) and torch.equal(short[1], named[1])
        assert torch.equal(alone, named[0])
        assert short[0].shape == (3, n_heads, 1, 40) and short[1].shape == (3, n_heads, 1)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda q, k, v: attnkit.attention(q, k, v, masks.padding([5, 3])), id="mask"),
        pytest.param(lambda q, k, v: attnkit.attention(q, k, v, softcap=3.0), id="softcap"),
        pytest.param(lambda q, k, v: attnkit.attention(q, k, v, q_offset=2), id="q_offset"),
        pytest.param(lambda q, k, v: attnkit.attention(q, k, v, scale=1), id="int_scale"),
        pytest.param(lambda q, k, v: attnkit.attention(q, k[:, :, :0], v[:, :, :0]), id="no_keys"),
        pytest.param(lambda q, k, v: attnkit.attention(q, k, v, backend="tiled"), id="backend"),
        pytest.param(
            lambda q, k, v: attnkit.attention(q.requires_grad_(True), k, v), id="requires_grad"
        ),
        pytest.param(
            lambda q, k, v: attnkit.attention(torch.nn.Parameter(q), k, v), id="tensor_subclass"
        ),
        pytest.param(
            lambda q, k, v: attnkit.attention(q, k.repeat_interleave(2, -1)[..., ::2], v),
            id="strided_last_dim",
        ),
        pytest.param(lambda q, k, v: attnkit.attention(q, k, v.to("meta")), id="meta"),
        pytest.param(lambda q, k, v: attnkit.attention(q, k, v.to_sparse()), id="sparse"),
    ],
)
def test_other_decode_calls_take_the_full_path(call, monkeypatch):
    # Each differs from the plain call in one way the short way does not take: a mask, a
    # softcap, an offset, a scale that is not a float, no keys, a named backend, a gradient,
    # a tensor subclass, rows not contiguous (the full path copies them), a tensor off the
    # CPU or not dense. With the full path made to fail, each must reach it.
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(gen, n_q=1, n_k=5)
    _without_the_full_path(monkeypatch)
    with pytest.raises(AssertionError, match="the full path ran"):
        call(q, k, v)


def test_inputs_that_require_grad_take_the_short_way_when_no_gradient_is_recorded(monkeypatch):
    gen = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(gen, n_q=1, n_k=9)
    want = attnkit.attention(q, k, v, backend="cpp_decode")
    q.requires_grad_(True)
    _without_the_full_path(monkeypatch)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(attnkit.attention(q, k, v), want)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda q, k, v: (q[:, :8], k, v), ValueError, "not a multiple of the 3 KV heads"),
        (
            lambda q, k, v: (q, k, v[..., :0]),
            ValueError,
            r"head_dim must be >= 1, got q \d+ and v 0",
        ),
        (lambda q, k, v: (q, k[:, :2], v), ValueError, "k has 2 heads but v has 3"),
        (lambda q, k, v: (q[:1], k, v), ValueError, "batch sizes differ"),
        (lambda q, k, v: (q[..., :8], k, v), ValueError, "q head_dim 8 differs"),
        (lambda q, k, v: (q, k[:, :, :4], v), ValueError, "k has 4 keys but v has 5"),
        (lambda q, k, v: (q.double(), k, v), TypeError, "must share a dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), TypeError, "allowed: torch.float16"),
        (lambda q, k, v: (q[:, :0], k, v), ValueError, "q must have at least one head"),
        (lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ],
)
def test_bad_decode_calls_get_the_full_paths_errors(change, error, message):
    # The short way takes only valid calls: a bad one, shaped as a decode call, still gets
    # the error that names the argument, its value and what is allowed.
    gen = torch.Generator().manual_seed(8)
    q, k, v = random_qkv(gen, n_q=1, n_k=5)
    with pytest.raises(error, match=message):
        attnkit.attention(*change(q, k, v))


@pytest.mark.parametrize("scale", [-1.0, 0.0, math.inf, math.nan])
def test_bad_scales_in_a_decode_call_are_named(scale):
    gen = torch.Generator().manual_seed(9)
    q, k, v = random_qkv(gen, n_q=1, n_k=5)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        attnkit.attention(q, k, v, scale=scale)


def test_the_short_ways_never_ask_for_the_kernel_for_a_query_off_the_cpu(monkeypatch):
    # A GPU call must not build the CPU kernel (~40 s) on its way to the full path: the short
    # ways ask q's device before the kernel module (meta stands in for a GPU here).
    def refuse():
        raise AssertionError("the CPU kernel was asked for")

    monkeypatch.setattr(cpu_decode, "loaded_kernel", refuse)
    gen = torch.Generator().manual_seed(12)
    q, k, v = (t.to("meta") for t in random_qkv(gen, n_q=1, n_k=5))
    assert plain_decode(q, k, v, None, False) is None
    table, lengths = torch.zeros(2, 1, dtype=torch.int32), torch.tensor([5, 5])
    pool = k.transpose(1, 2)  # (batch blocks, 5 tokens, kv_heads, d)
    assert cpu_decode.plain_paged_decode(q[:, :, 0], pool, pool, table, lengths, None, None) is None


def test_without_the_kernel_a_plain_decode_call_is_answered_by_torch(cpp_switched_off):
    gen = torch.Generator().manual_seed(10)
    q, k, v = random_qkv(gen, n_q=1, n_k=20)
    assert plain_decode(q, k, v, None, False) is None
    assert_matches_reference("auto", q, k, v)


def test_a_replaced_cpp_decode_backend_serves_plain_decode_calls():
    # `register(..., replace=True)` changes what `auto` gets: the short way must not bypass
    # a replacement of the backend it stands in for.
    original = get_backend("cpp_decode")
    ran = []

    class Watched(CppDecodeBackend):
        def run(self, p):
            ran.append(p.n_q)
            return super().run(p)

    gen = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(gen, n_q=1, n_k=12)
    register(Watched(), replace=True)
    try:
        got = attnkit.attention(q, k, v)
    finally:
        register(original, replace=True)
    assert ran == [1]
    assert_matches_reference("cpp_decode", q, k, v)
    torch.testing.assert_close(got, attnkit.attention(q, k, v), rtol=0, atol=0)


def test_the_short_way_takes_an_empty_batch_and_broadcast_kv(monkeypatch):
    # K/V expanded over their heads (stride 0: one row read for every KV head) and a batch
    # of none, both answered by the kernel as the full path would.
    gen = torch.Generator().manual_seed(12)
    q, k, v = random_qkv(gen, batch=2, heads=6, kv_heads=1, n_q=1, n_k=9)
    k, v = k.expand(2, 3, 9, 16), v.expand(2, 3, 9, 16)
    assert k.stride(1) == 0
    assert_matches_reference("cpp_decode", q, k, v)
    want = attnkit.attention(q, k, v, backend="cpp_decode")
    _without_the_full_path(monkeypatch)
    torch.testing.assert_close(attnkit.attention(q, k, v), want, rtol=0, atol=0)
    out, lse = attnkit.attention(q[:0], k[:0], v[:0], return_lse=True)
    assert out.shape == (0, 6, 1, 16) and lse.shape == (0, 6, 1)
