"""The C++ decode kernel on int8 K/V with one float32 scale per row (QuantizedCache's
storage): equal to the float64 definition over the dequantized rows, read in place.

Tolerance: the project's rule, against the float64 oracle on the dequantized K/V: at most
2x the error of the plain float32 torch path on the same dequantized values, plus 4 float32
eps. Split counts agree to 1e-6 (they only reorder sums).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_cpu_decode import assert_close_to
from test_paged_decode import make_problem, oracle

from attnkit.cache.quantized import dequantize, quantize
from attnkit.ops import cpu_decode
from attnkit.ops.paged_decode import paged_decode

pytestmark = pytest.mark.skipif(
    not cpu_decode.cpu_decode_available(),
    reason=f"C++ decode kernel unavailable: {cpu_decode.cpu_decode_unavailable_reason()}",
)  # test_cpu_decode.test_the_kernel_builds fails with the reason: never a silent pass


def quantized_problem(shape, lengths, block_size, seed=0):
    """A shuffled int8 pool with its scales, and its dequantized float32 twin."""
    q, k, v, table, lengths = make_problem(*shape, lengths, block_size, seed=seed)
    (k8, ks), (v8, vs) = quantize(k.float()), quantize(v.float())
    dequantized = dequantize(k8, ks, torch.float32), dequantize(v8, vs, torch.float32)
    return q.float(), (k8, v8), (ks, vs), dequantized, table, lengths


@pytest.mark.parametrize("block_size", [16, 3])
@pytest.mark.parametrize("lengths", [[1, 37, 0, 64, 200], [1025, 5]], ids=str)
@pytest.mark.parametrize("shape", [(9, 3, 64, 64), (8, 1, 40, 24), (32, 8, 128, 128)], ids=str)
def test_int8_pool_matches_the_oracle_on_its_dequantized_rows(shape, lengths, block_size):
    q, (k8, v8), scales, (k, v), table, lens = quantized_problem(shape, lengths, block_size)
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = cpu_decode.cpp_decode(q, k8, v8, table, lens, scale, None, scales)
    want, want_lse = oracle(q, k, v, table, lens, scale)
    plain, plain_lse = paged_decode(q, k, v, table, lens, backend="torch", return_lse=True)
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert (out[lens == 0] == 0).all() and torch.isinf(lse[lens == 0]).all()
    assert_close_to(out, want, plain, torch.float32, "output")
    assert_close_to(lse, want_lse, plain_lse, torch.float32, "lse")
    for splits in (1, 3, 64):  # slices merged by lse: the same answer
        split, _ = cpu_decode.cpp_decode(q, k8, v8, table, lens, scale, splits, scales)
        assert (split - out).abs().max() < 1e-6


def test_scales_are_read_through_their_own_strides():
    # A contiguous cache keeps scales as (slots, kv_heads, capacity): token-minor, unlike
    # the rows; the kernel must follow the scale tensor's strides, not the rows'.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 32, generator=g)
    k, v = torch.randn(2, 3, 50, 32, generator=g), torch.randn(2, 3, 50, 32, generator=g)
    (k8, ks), (v8, vs) = quantize(k), quantize(v)
    lengths = torch.tensor([50, 17])
    out, _ = cpu_decode.decode_contiguous(q, k8, v8, lengths, 0.2, scales=(ks, vs))
    k32, v32 = dequantize(k8, ks, torch.float32), dequantize(v8, vs, torch.float32)
    want, _ = cpu_decode.decode_contiguous(q.double(), k32.double(), v32.double(), lengths, 0.2)
    assert (out.double() - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scales": (None, None)}, "int8 k and v need k_scale and v_scale"),
        ({"q": torch.zeros(1, 2, 8, dtype=torch.float64)}, "int8 k needs int8 v and a float32 q"),
        ({"v": torch.zeros(1, 4, 1, 8)}, "int8 k needs int8 v and a float32 q"),
        ({"k": torch.zeros(1, 4, 1, 8), "v": torch.zeros(1, 4, 1, 8)}, "go with int8 k and v"),
        (
            {"scales": (torch.ones(1, 4, 2), torch.ones(1, 4, 1))},
            r"k_scale and v_scale must be float32 \(num_blocks, block_size, kv_heads\)",
        ),
        (
            {"scales": (torch.ones(1, 4, 1, dtype=torch.float16), torch.ones(1, 4, 1))},
            r"k_scale and v_scale must be float32",
        ),
    ],
)
def test_bad_int8_inputs_raise_naming_what_is_wrong(change, message):
    args = {
        "q": torch.zeros(1, 2, 8),
        "k": torch.zeros(1, 4, 1, 8, dtype=torch.int8),
        "v": torch.zeros(1, 4, 1, 8, dtype=torch.int8),
        "scales": (torch.ones(1, 4, 1), torch.ones(1, 4, 1)),
    } | change
    with pytest.raises(ValueError, match=message):
        cpu_decode.cpp_decode(
            args["q"], args["k"], args["v"], None, None, 1.0, None, args["scales"]
        )


def test_bad_scales_of_a_contiguous_cache_name_its_layout():
    # decode_contiguous reads (batch, kv_heads, n) scales: a mismatch names that layout
    k8 = torch.zeros(1, 4, 3, 8, dtype=torch.int8)
    scales = (torch.ones(1, 3, 4), torch.ones(1, 3, 4))  # (batch, n, kv_heads): transposed
    with pytest.raises(
        ValueError, match=r"k_scale and v_scale must be float32 \(batch, kv_heads, n\)"
    ):
        cpu_decode.decode_contiguous(torch.zeros(1, 4, 8), k8, k8, None, 1.0, scales=scales)
