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


def test_a_mask_that_is_not_a_key_prefix_still_gives_the_reference_answer():
    # a window in the middle of the keys (and sinks): the backend hands it to torch SDPA
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, n_q=1, n_k=60)
    for mask in (masks.sliding_window(8), masks.sliding_window(8) | masks.sinks(2)):
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
