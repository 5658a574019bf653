"""The fused C++ decode kernel (backend="cpp") equals the float64 definition.

Oracles: the token-by-token float64 `oracle` of test_paged_decode.py for paged pools, and
`attnkit.attention(..., backend="reference")` in float64 for contiguous caches.

Tolerances: float64 inputs (the kernel accumulates in float64) 1e-12; float32, bfloat16 and
float16 by the project's rule: error vs the float64 oracle <= 2x the error of the plain
torch path (`backend="torch"`) in the same dtype, plus `NOISE_FLOOR` (4 eps of the dtype).
Answers of the kernel with different split counts agree to 1e-13 (float64) and 1e-6
(float32), relative to 1 + |lse| for the lse: the splits only change the order of sums.

The kernel is compiled on first use. Without a compiler `test_the_kernel_builds` fails with
the reason, and the other tests skip with that reason printed (`-ra`): never a silent pass.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_paged_decode import make_problem, oracle

from attn_testing import NOISE_FLOOR, max_err
from attnkit import attention
from attnkit.cache import ContiguousCache
from attnkit.cache.paged import PagedCache
from attnkit.ops import cpp_build, cpu_decode
from attnkit.ops import paged_decode as paged_decode_module
from attnkit.ops.decode_attention import decode_attention
from attnkit.ops.masks import padding
from attnkit.ops.paged_decode import paged_decode


def test_the_kernel_builds():
    reason = cpu_decode.cpu_decode_unavailable_reason()
    assert cpu_decode.cpu_decode_available(), f"the C++ decode kernel did not build: {reason}"


NEED_NO_KERNEL = {
    "test_the_kernel_builds",
    "test_without_a_compiler_auto_falls_back_and_cpp_says_why",
}


@pytest.fixture(autouse=True)
def kernel(request):
    if request.node.originalname in NEED_NO_KERNEL:
        return
    if not cpu_decode.cpu_decode_available():
        pytest.skip(f"C++ decode kernel unavailable: {cpu_decode.cpu_decode_unavailable_reason()}")


def assert_close_to(got, want, plain, dtype, what):
    """float64: 1e-12; else <= 2x the plain torch error + 4 eps. NaN always fails."""
    assert not torch.isnan(got).any(), f"NaN in {what}"
    err = max_err(got, want)
    if dtype == torch.float64:
        assert err < 1e-12, f"{what} error {err:.3g}"
    else:
        plain_err = max_err(plain, want)
        floor = NOISE_FLOOR[dtype]
        assert err <= 2 * plain_err + floor, f"{what} error {err:.3g} > 2 x {plain_err:.3g}"


def check_paged(q, k, v, table, lens, *, num_splits=None, scale=None, window=None, sinks=0):
    """The cpp backend vs the float64 oracle (and the torch path in q's dtype)."""
    scale_value = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    seen = dict(window=window, sinks=sinks)
    out, lse = paged_decode(
        q, k, v, table, lens, backend="cpp", num_splits=num_splits, return_lse=True, scale=scale,
        **seen,
    )  # fmt: skip
    want, want_lse = oracle(q, k, v, table, lens, scale_value, **seen)
    plain, plain_lse = paged_decode(
        q, k, v, table, lens, backend="torch", return_lse=True, scale=scale, **seen
    )
    assert out.dtype == q.dtype and out.shape == want.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "lse -inf rows differ"
    assert (out[lens == 0] == 0).all(), "sequences without keys must give zeros"
    assert_close_to(out, want, plain, q.dtype, "output")
    assert_close_to(lse, want_lse, plain_lse, q.dtype, "lse")
    return out, lse


SHAPES = [  # (heads, kv_heads, d, dv): MHA, GQA 9/3, MQA 8/1, odd dims, dv != d, 32/8 x 128
    (4, 4, 16, 16),
    (9, 3, 64, 64),
    (8, 1, 40, 24),
    (6, 2, 33, 17),
    (12, 4, 59, 111),
    (32, 8, 128, 128),
]
LENGTHS = [[1, 37, 0, 64, 200], [5], [16, 16, 17], [1025, 0, 3]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("block_size", [16, 5, 1])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_paged_matches_the_oracle(shape, lengths, block_size, dtype):
    h, kvh, d, dv = shape
    q, k, v, table, lens = make_problem(h, kvh, d, dv, lengths, block_size, dtype=dtype, seed=7)
    check_paged(q, k, v, table, lens)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_split_counts_give_the_same_answer(dtype):
    q, k, v, table, lens = make_problem(9, 3, 64, 48, [3000, 1, 0, 777], 16, dtype=dtype, seed=11)
    answers = [check_paged(q, k, v, table, lens, num_splits=s) for s in (1, 2, 7, 64, None)]
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    first_out, first_lse = answers[0]
    lse_scale = 1 + first_lse[torch.isfinite(first_lse)].abs().max().item()  # lse ~ log(n)
    for out, lse in answers[1:]:
        assert max_err(out, first_out) < tol
        assert max_err(lse, first_lse) < tol * lse_scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("num_splits", [None, 3, 7])
@pytest.mark.parametrize("block_size", [24, 48])
@pytest.mark.parametrize(
    "shape",
    [(9, 3, 64, 64), (8, 4, 16, 16), (6, 2, 33, 17), (8, 1, 256, 200), (32, 8, 128, 128)],
    ids=str,
)
def test_blocks_of_other_sizes_and_slices_that_start_inside_a_block(
    shape, block_size, num_splits, dtype
):
    """Blocks longer than a tile (48 tokens) or not a multiple of 16 (24), with context slices
    that start inside a block: read in place, a tile stops at its block's end, and the tile
    after a short one must still be read whole. Tokens under 1 KiB over several heads are read
    in place in float64 too (8/4 d16, 6/2 d33; 9/3 d64 only in float32), as is one KV head in
    48-token blocks (8/1 d256); 32/8 d128 goes one key at a time in memory order."""
    h, kvh, d, dv = shape
    q, k, v, table, lens = make_problem(
        h, kvh, d, dv, [500, 37, 1, 130], block_size, dtype=dtype, seed=13
    )
    check_paged(q, k, v, table, lens, num_splits=num_splits)


def in_runs(table, lens, block_size, num_blocks, seed):
    """`table` with its blocks in use renumbered into runs of consecutive ids (1-6 blocks, as
    a pool hands out a prompt's blocks), the runs in random order, so that a sequence's
    blocks often lie end to end in the pool and a tile may read across them."""
    g = torch.Generator().manual_seed(seed)
    runs, start = [], 0
    while start < num_blocks:
        end = min(num_blocks, start + int(torch.randint(1, 7, (1,), generator=g)))
        runs.append(range(start, end))
        start = end
    ids = iter([i for j in torch.randperm(len(runs), generator=g).tolist() for i in runs[j]])
    table = table.clone()
    for b, n in enumerate(lens.tolist()):
        for j in range(-(-n // block_size)):
            table[b, j] = next(ids)
    return table


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("num_splits", [None, 3, 7])
@pytest.mark.parametrize("block_size", [16, 20, 24, 48])
@pytest.mark.parametrize("shape", [(9, 3, 64, 64), (8, 4, 16, 16), (6, 2, 33, 17)], ids=str)
def test_tiles_read_across_blocks_that_lie_end_to_end(shape, block_size, num_splits, dtype):
    """Blocks with consecutive ids lie end to end in a pool, so a tile read in place runs on
    from one into the next (up to 32 tokens, from any token of its first block); a run may
    end anywhere, and slices may start inside a block."""
    h, kvh, d, dv = shape
    lengths = [500, 37, 130, 1, 0, 64]
    q, k, v, table, lens = make_problem(h, kvh, d, dv, lengths, block_size, dtype=dtype, seed=5)
    table = in_runs(table, lens, block_size, k.shape[0], seed=block_size)
    check_paged(q, k, v, table, lens, num_splits=num_splits)


@pytest.mark.parametrize("apart", ["k", "v", "kv"])
@pytest.mark.parametrize("block_size", [16, 24])
def test_consecutive_ids_of_blocks_apart_in_memory_are_read_block_by_block(block_size, apart):
    """A pool whose blocks are not end to end (a view of the first block_size tokens of
    longer blocks, the rest NaN), in K, in V or in both: a tile must not run past a block's
    end even where the next block's id follows, or it reads the NaN between them."""
    q, k, v, table, lens = make_problem(
        9, 3, 64, 64, [300, 77], block_size, dtype=torch.float32, seed=3
    )
    table = in_runs(table, lens, block_size, k.shape[0], seed=1)

    def blocks_apart(t):
        big = torch.full((t.shape[0], block_size + 5, *t.shape[2:]), math.nan)
        big[:, :block_size] = t
        return big[:, :block_size]

    k = blocks_apart(k) if "k" in apart else k
    v = blocks_apart(v) if "v" in apart else v
    out, lse = check_paged(q, k, v, table, lens)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize(
    "layout",
    ["int32", "int64", "int16", "int32 strided", "int64 strided", "lengths strided"],
)
def test_tables_and_lengths_of_any_integer_layout(layout):
    # int64 and int32 read in place or widened by the kernel; others converted by torch.
    q, k, v, table, lens = make_problem(6, 2, 16, 16, [40, 3, 0, 17], 8, dtype=torch.float64)
    dtype = {"int16": torch.int16, "int64": torch.int64, "int64 strided": torch.int64}.get(
        layout, torch.int32
    )
    table, lens = table.to(dtype), lens.to(torch.int32)
    if "strided" in layout:  # every other column (or entry) of a wider tensor
        wide = torch.stack([table, torch.full_like(table, -7)], dim=-1).flatten(1)
        table = wide[:, ::2]
        assert not table.is_contiguous()
    if layout == "lengths strided":
        lens = torch.stack([lens, torch.full_like(lens, 10**6)], dim=-1).flatten()[::2]
        assert not lens.is_contiguous()
    check_paged(q, k, v, table, lens)


def test_more_splits_than_tokens():
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [3, 1, 0], 4, dtype=torch.float64)
    check_paged(q, k, v, table, lens, num_splits=8)


def test_shared_blocks_and_a_custom_scale():
    """Prefix sharing: sequences point at the same blocks (and one block twice)."""
    q, k, v, table, lens = make_problem(8, 2, 32, 32, [40, 40, 40], 8, dtype=torch.float64)
    table[1, :3] = table[0, :3]  # a shared prefix of 3 blocks
    table[2, :5] = table[0, 2]  # one block read five times
    check_paged(q, k, v, table, lens, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_pools_with_a_strided_last_dim_are_copied_not_misread(dtype):
    # Pools whose rows are not contiguous (every other element of a wider pool): the kernel
    # reads rows as contiguous, so they are copied first; the answer matches the oracle.
    q, k, v, table, lens = make_problem(6, 2, 16, 16, [37, 5, 0], 8, dtype=dtype)
    wide_k, wide_v = (t.repeat_interleave(2, dim=-1) for t in (k, v))
    k, v = wide_k[..., ::2], wide_v[..., 1::2]
    assert k.stride(-1) == 2 and v.stride(-1) == 2
    check_paged(q, k, v, table, lens)


@pytest.mark.parametrize("block_size", [8, 24])  # gathered, read in place
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_nan_past_each_length_does_not_leak(num_splits, block_size):
    q, k, v, table, lens = make_problem(
        6, 2, 24, 24, [13, 0, 50, 1], block_size, dtype=torch.float64
    )
    want, want_lse = oracle(q, k, v, table, lens, 1 / math.sqrt(24))
    used = torch.zeros(k.shape[:2], dtype=torch.bool)  # (num_blocks, block_size)
    for b, n in enumerate(lens.tolist()):
        for t in range(n):
            used[table[b, t // block_size], t % block_size] = True
    k[~used], v[~used] = math.nan, math.nan  # every slot no sequence owns, in every head
    table[1] = -1  # the empty sequence's entries are junk too
    out, lse = paged_decode(
        q, k, v, table, lens, backend="cpp", num_splits=num_splits, return_lse=True
    )
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert max_err(out, want) < 1e-12 and max_err(lse, want_lse) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("block_size", [16, 48])
def test_head_major_pools_take_one_kv_head_per_item(block_size, dtype):
    """A pool stored (num_blocks, kv_heads, block_size, d) and viewed token-major: a token's
    heads do not lie side by side, so each work item takes one KV head."""
    q, k, v, table, lens = make_problem(9, 3, 40, 24, [100, 7, 0, 61], block_size, dtype=dtype)
    head_major = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    k, v = head_major(k), head_major(v)
    assert k.stride(2) > k.stride(1)  # heads apart, tokens side by side
    check_paged(q, k, v, table, lens, num_splits=3)


@pytest.mark.parametrize("check", [True, False])
def test_a_pool_of_empty_blocks(check):
    """block_size 0: every length must be 0, and every query sees no key."""
    q = torch.randn(2, 4, 8)
    k = torch.zeros(3, 0, 2, 8)
    table = torch.zeros(2, 1, dtype=torch.int32)
    out, lse = paged_decode(
        q,
        k,
        k,
        table,
        torch.zeros(2, dtype=torch.int64),
        backend="cpp",
        return_lse=True,
        check=check,
    )
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_is_widened_on_load(dtype):
    q, k, v, table, lens = make_problem(8, 2, 64, 64, [70, 3, 129, 0], 16, seed=2)
    want, want_lse = oracle(q, k, v, table, lens, 0.125)
    args = [t.to(dtype) for t in (q, k, v)] + [table, lens]
    out, lse = paged_decode(*args, backend="cpp", scale=0.125, return_lse=True)
    plain, plain_lse = paged_decode(*args, backend="torch", scale=0.125, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_to(out, want, plain, dtype, "output")
    assert_close_to(lse, want_lse, plain_lse, dtype, "lse")


def test_repeated_runs_are_bitwise_identical():
    q, k, v, table, lens = make_problem(32, 8, 128, 128, [2000, 7, 900], 16, seed=4)
    first = paged_decode(q, k, v, table, lens, backend="cpp", return_lse=True)
    for _ in range(3):
        again = paged_decode(q, k, v, table, lens, backend="cpp", return_lse=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_auto_picks_cpp_on_cpu():
    q, k, v, table, lens = make_problem(9, 3, 16, 16, [20, 5], 4, seed=5)
    auto = paged_decode(q, k, v, table, lens, return_lse=True)
    cpp = paged_decode(q, k, v, table, lens, backend="cpp", return_lse=True)
    assert torch.equal(auto[0], cpp[0]) and torch.equal(auto[1], cpp[1])
    kc, vc = k[:2].transpose(1, 2), v[:2].transpose(1, 2)  # (2, kv_heads, 4, d)
    assert torch.equal(decode_attention(q, kc, vc), decode_attention(q, kc, vc, backend="cpp"))


def test_inputs_that_require_grad_go_to_torch_or_raise():
    """The kernel has no backward: auto must not hand it a request that wants gradients."""
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [9, 3], 4, dtype=torch.float64)
    q.requires_grad_(True)
    out = paged_decode(q, k, v, table, lens)
    out.sum().backward()  # the torch path: gradients flow
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="cpp backend has no backward, but an input requires grad"):
        paged_decode(q, k, v, table, lens, backend="cpp")
    kc, vc = k[:2].transpose(1, 2), v[:2].transpose(1, 2)
    with pytest.raises(ValueError, match="cpp backend has no backward, but an input requires grad"):
        decode_attention(q, kc, vc, backend="cpp")
    assert decode_attention(q, kc, vc).grad_fn is not None
    with torch.no_grad():  # no gradient wanted: the kernel again
        want = decode_attention(q.detach(), kc, vc, backend="cpp")
        assert torch.equal(decode_attention(q, kc, vc), want)


def test_without_a_compiler_auto_falls_back_and_cpp_says_why(monkeypatch):
    monkeypatch.setitem(cpp_build._built, cpu_decode.SOURCE_NAME, "CalledProcessError: no g++")
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [9, 0], 4, dtype=torch.float64)
    want = paged_decode(q, k, v, table, lens, backend="torch")
    assert torch.equal(paged_decode(q, k, v, table, lens), want)
    with pytest.raises(RuntimeError, match=r"backend='cpp' is not available: .*no g\+\+"):
        paged_decode(q, k, v, table, lens, backend="cpp")
    kc, vc = k[:2].transpose(1, 2), v[:2].transpose(1, 2)  # (2, kv_heads, 4, d)
    want = decode_attention(q, kc, vc, backend="torch")
    assert torch.equal(decode_attention(q, kc, vc), want)
    with pytest.raises(RuntimeError, match="no g"):
        decode_attention(q, kc, vc, backend="cpp")


@torch.no_grad()
def test_reads_a_real_paged_cache_in_place():
    """Sequences written through PagedCache (forks share blocks) decode as its gathered view."""
    kvh, d, h = 2, 16, 6
    cache = PagedCache(1, kvh, d, num_blocks=40, block_size=4, seed=3, dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (9, 1, 14), strict=True):
        cache.prepare([seq], n)
        kv = torch.randn(2, 1, kvh, n, d, generator=g, dtype=torch.float64)
        cache.update(0, kv[0], kv[1])
    seqs.append(cache.fork(seqs[0]))
    step = cache.prepare(seqs, 1)
    new = torch.randn(2, len(seqs), kvh, 1, d, generator=g, dtype=torch.float64)
    k_view, v_view = cache.update(0, new[0], new[1])
    q = torch.randn(len(seqs), h, d, generator=g, dtype=torch.float64)
    lengths = torch.tensor([cache.length(s) for s in seqs])
    want = attention(q.unsqueeze(2), k_view, v_view, padding(lengths), backend="reference")
    got = paged_decode(
        q, cache.k_pool[0], cache.v_pool[0], step.block_table, lengths, backend="cpp"
    )
    assert max_err(got, want.squeeze(2)) < 1e-12


# -- contiguous caches ----------------------------------------------------------------------


def reference_decode(q, k, v, lengths, scale=None):
    """float64 attention of q (batch, heads, d) over the first lengths[b] keys."""
    mask = None if lengths is None else padding(lengths)
    out, lse = attention(
        q.double().unsqueeze(2),
        k.double(),
        v.double(),
        mask,
        scale=scale,
        backend="reference",
        return_lse=True,
    )
    return out.squeeze(2), lse.squeeze(2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_contiguous_cache_views_match_the_reference(shape, dtype):
    """The (batch, kv_heads, n, d) views a ContiguousCache hands out: sliced, not copied."""
    h, kvh, d, dv = shape
    g = torch.Generator().manual_seed(8)
    k_buf = torch.randn(2, 5, kvh, 300, d, generator=g, dtype=torch.float64).to(dtype)
    v_buf = torch.randn(2, 5, kvh, 300, dv, generator=g, dtype=torch.float64).to(dtype)
    k, v = k_buf[1, 1:4, :, :257], v_buf[1, 1:4, :, :257]  # layer 1, slots 1-3, 257 of 300
    assert not k.is_contiguous()
    lengths = torch.tensor([257, 0, 100])
    q = torch.randn(3, h, d, generator=g, dtype=torch.float64).to(dtype)
    k_buf[1, 3, :, 100:257] = math.nan  # past the third sequence's length: must not leak
    v_buf[1, 3, :, 100:257] = math.nan
    out, lse = decode_attention(q, k, v, lengths, backend="cpp", return_lse=True)
    want, want_lse = reference_decode(q, k.nan_to_num(), v.nan_to_num(), lengths)
    plain, plain_lse = decode_attention(
        q, k.nan_to_num(), v.nan_to_num(), lengths, backend="torch", return_lse=True
    )
    assert out.shape == (3, h, dv) and out.dtype == dtype
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all()
    assert_close_to(out, want, plain, dtype, "output")
    assert_close_to(lse, want_lse, plain_lse, dtype, "lse")


@pytest.mark.parametrize("strided_query", [False, True])
def test_contiguous_without_lengths_and_with_a_4d_query(strided_query):
    # The kernel takes the (batch, heads, 1, d) query and answers in that shape itself; a
    # query sliced out of a longer one (not contiguous) is copied, not misread.
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 6, 3 if strided_query else 1, 20, generator=g, dtype=torch.float64)
    q = q[:, :, 1:2] if strided_query else q
    assert q.is_contiguous() != strided_query
    k = torch.randn(2, 3, 33, 20, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 33, 12, generator=g, dtype=torch.float64)
    out, lse = decode_attention(q, k, v, scale=0.5, backend="cpp", return_lse=True)
    want, want_lse = reference_decode(q.squeeze(2), k, v, None, scale=0.5)
    assert out.shape == (2, 6, 1, 12) and lse.shape == (2, 6, 1)
    assert max_err(out.squeeze(2), want) < 1e-12 and max_err(lse.squeeze(2), want_lse) < 1e-12


def test_contiguous_split_counts_and_strided_last_dim():
    g = torch.Generator().manual_seed(10)
    q = torch.randn(1, 8, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 16, 5000, generator=g, dtype=torch.float64).transpose(2, 3)
    v = torch.randn(1, 2, 5000, 16, generator=g, dtype=torch.float64)
    assert k.stride(-1) != 1  # copied for the kernel: must work, not raise
    want, _ = reference_decode(q, k, v, None)
    for splits in (1, 4, None):
        assert max_err(decode_attention(q, k, v, backend="cpp", num_splits=splits), want) < 1e-12


def test_contiguous_float32_slices_merge_to_the_reference():
    # The in-place path (`attend_in_place`: one KV head of a contiguous cache) on slices that
    # start off the 32-token grid and end on a partial tile, and with 64 splits on slices past the
    # end (start == end == length > 0).
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 12, 40, generator=g)
    k = torch.randn(2, 4, 1027, 40, generator=g)
    v = torch.randn(2, 4, 1027, 24, generator=g)
    lengths = torch.tensor([1027, 515])
    want, want_lse = reference_decode(q, k, v, lengths)
    plain, plain_lse = decode_attention(q, k, v, lengths, backend="torch", return_lse=True)
    answers = []
    for splits in (1, 3, 7, 64, None):
        out, lse = decode_attention(
            q, k, v, lengths, backend="cpp", num_splits=splits, return_lse=True
        )
        assert_close_to(out, want, plain, torch.float32, f"output, {splits} splits")
        assert_close_to(lse, want_lse, plain_lse, torch.float32, f"lse, {splits} splits")
        answers.append(out)
    assert all(max_err(a, answers[0]) < 1e-6 for a in answers)


@pytest.mark.parametrize(
    "shape",
    [(5, 1, 128, 128), (3, 3, 128, 64), (6, 2, 64, 128), (8, 8, 128, 128), (32, 8, 128, 128)],
    ids=str,
)
def test_rows_of_eight_vectors_read_in_order_match_the_reference(shape):
    # d or dv of 128 in float32 (8 AVX-512 vectors): one KV head read in place scores 4 keys
    # row by row for pairs of queries and a lone last one (odd groups), and sums whole value
    # rows; lengths off the 4-key and 32-token grids leave tails. Contiguous views, and a
    # paged pool of one KV head per item in 32-token blocks (read in place too). In an AVX2
    # build (make test's x86-64-v3 rerun, AVX2 hosts) the same cases take the 4-key paths.
    h, kvh, d, dv = shape
    g = torch.Generator().manual_seed(14)
    q = torch.randn(3, h, d, generator=g)
    k = torch.randn(3, kvh, 301, d, generator=g)
    v = torch.randn(3, kvh, 301, dv, generator=g)
    lengths = torch.tensor([301, 2, 131])
    want, want_lse = reference_decode(q, k, v, lengths)
    plain, plain_lse = decode_attention(q, k, v, lengths, backend="torch", return_lse=True)
    for splits in (1, 3, None):
        out, lse = decode_attention(
            q, k, v, lengths, backend="cpp", num_splits=splits, return_lse=True
        )
        assert_close_to(out, want, plain, torch.float32, f"output, {splits} splits")
        assert_close_to(lse, want_lse, plain_lse, torch.float32, f"lse, {splits} splits")
    if kvh == 1:  # (blocks, 32 tokens, 1 KV head, d): one head per item, read in place
        q3, k_p, v_p, table, lens = make_problem(h, kvh, d, dv, [301, 2, 131], 32, seed=15)
        check_paged(q3, k_p, v_p, table, lens)


def test_the_torch_backends_never_call_the_kernel(monkeypatch):
    # `backend="torch"` is the plain-torch baseline the kernel is tested against: on CPU it
    # must not end in the kernel itself (attnkit.attention's `auto` would pick it).
    def refuse(*args, **kwargs):
        raise AssertionError("backend='torch' called the C++ decode kernel")

    kernel = cpu_decode.loaded_kernel()
    for entry in ("decode", "try_decode", "try_paged_decode"):  # every way into the module
        monkeypatch.setattr(kernel, entry, refuse)
    q, k, v, table, lens = make_problem(8, 2, 32, 32, [9, 20], 8, dtype=torch.float32)
    want, _ = oracle(q, k, v, table, lens, 32**-0.5)
    paged = paged_decode(q, k, v, table, lens, backend="torch")
    assert max_err(paged, want) < 1e-5
    k_seq = torch.randn(2, 2, 20, 32)
    v_seq = torch.randn(2, 2, 20, 32)
    out = decode_attention(q, k_seq, v_seq, torch.tensor([20, 5]), backend="torch")
    want, _ = reference_decode(q, k_seq, v_seq, torch.tensor([20, 5]))
    assert max_err(out, want) < 1e-5


def test_the_torch_backend_takes_an_empty_batch_with_lengths():
    q, k, v = torch.randn(0, 4, 8), torch.randn(0, 2, 5, 8), torch.randn(0, 2, 5, 8)
    for backend in ("torch", "cpp"):
        out = decode_attention(q, k, v, torch.zeros(0, dtype=torch.long), backend=backend)
        assert out.shape == (0, 4, 8)


def test_token_major_k_v_take_the_whole_token_path():
    # (batch, n, kv_heads, d) storage seen as (batch, kv_heads, n, d): a head's rows are not
    # back to back, so the kernel reads every KV head of a token together instead.
    g = torch.Generator().manual_seed(11)
    q = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    k = torch.randn(3, 40, 2, 16, generator=g, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(3, 40, 2, 8, generator=g, dtype=torch.float64).transpose(1, 2)
    lengths = torch.tensor([40, 7, 1])
    want, want_lse = reference_decode(q, k, v, lengths)
    out, lse = decode_attention(q, k, v, lengths, backend="cpp", return_lse=True)
    assert max_err(out, want) < 1e-12 and max_err(lse, want_lse) < 1e-12


@torch.no_grad()
def test_reads_a_real_contiguous_cache_in_place():
    cache = ContiguousCache(2, 2, 16, max_seqs=3, max_len=64, dtype=torch.float64)
    g = torch.Generator().manual_seed(12)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (9, 30, 1), strict=True):
        cache.prepare([seq], n)
        for layer in range(2):
            kv = torch.randn(2, 1, 2, n, 16, generator=g, dtype=torch.float64)
            cache.update(layer, kv[0], kv[1])
    cache.prepare(seqs, 1)
    new = torch.randn(2, 3, 2, 1, 16, generator=g, dtype=torch.float64)
    k, v = cache.update(1, new[0], new[1])  # views of the (layers, slots, ...) buffer
    assert k.data_ptr() == cache.k[1].data_ptr()
    lengths = torch.tensor([cache.length(s) for s in seqs])
    q = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    want, _ = reference_decode(q, k, v, lengths)
    assert max_err(decode_attention(q, k, v, lengths, backend="cpp"), want) < 1e-12


def test_empty_batch_and_empty_cache():
    q = torch.zeros(0, 4, 8)
    k = torch.zeros(0, 2, 5, 8)
    out, lse = decode_attention(q, k, k, backend="cpp", return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)
    q = torch.randn(2, 4, 8)
    k = torch.zeros(2, 2, 0, 8)  # no keys at all
    out, lse = decode_attention(q, k, k, backend="cpp", return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


# -- hypothesis -------------------------------------------------------------------------------


@st.composite
def paged_problems(draw):
    kv_heads = draw(st.integers(1, 4))
    group = draw(st.integers(1, 9))
    d = draw(st.integers(1, 70))
    dv = draw(st.sampled_from([d, draw(st.integers(1, 70))]))
    block_size = draw(st.sampled_from([1, 3, 16, 24, 48, 64]))
    lengths = draw(st.lists(st.integers(0, 700), min_size=1, max_size=4))
    splits = draw(st.sampled_from([None, 1, 2, 5]))
    seed = draw(st.integers(0, 2**16))
    runs = draw(st.booleans())  # blocks in runs of consecutive ids, else shuffled
    return kv_heads * group, kv_heads, d, dv, lengths, block_size, splits, seed, runs


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(paged_problems())
def test_any_paged_problem_matches_the_oracle(problem):
    h, kvh, d, dv, lengths, block_size, splits, seed, runs = problem
    q, k, v, table, lens = make_problem(
        h, kvh, d, dv, lengths, block_size, dtype=torch.float64, seed=seed
    )
    if runs:
        table = in_runs(table, lens, block_size, k.shape[0], seed)
    check_paged(q, k, v, table, lens, num_splits=splits)


def _without_the_full_paged_path(monkeypatch):
    """Make paged_decode's full path fail loudly: an answer can only come from its short way."""

    def full_path(*args, **kwargs):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(paged_decode_module, "_check_shapes", full_path)


@pytest.mark.parametrize("backend", ["auto", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_a_plain_paged_call_takes_the_short_way(dtype, backend, monkeypatch):
    # The kernel's own checks let a plain call skip paged_decode's Python (~50 us from cold
    # caches): the same kernel, so bitwise the answer of the kernel called directly, for an
    # int32 or int64 table, a custom scale and split count, and a strided pool.
    q, k, v, table, lens = make_problem(9, 3, 64, 40, [70, 1, 0, 33], 16, dtype=dtype, seed=4)
    k = torch.cat([k, k], dim=-2)[:, :, :3]  # the same rows, each token twice as far apart
    for table_, scale, splits in ((table, None, None), (table.long(), 0.25, 3)):
        used = 1 / math.sqrt(64) if scale is None else scale
        want = cpu_decode.cpp_decode(q, k, v, table_, lens, used, splits)
        with monkeypatch.context() as patch:
            _without_the_full_paged_path(patch)
            out, lse = paged_decode(
                q,
                k,
                v,
                table_,
                lens,
                scale=scale,
                num_splits=splits,
                backend=backend,
                return_lse=True,
            )
            alone = paged_decode(q, k, v, table_, lens, scale=scale, num_splits=splits)
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1]) and torch.equal(alone, out)
        answer = paged_decode(q, k, v, table_, lens, backend=backend, return_lse=True)
        assert type(answer) is tuple  # as the full path answers, not a list


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(dict(backend="torch"), id="torch_backend"),
        pytest.param(dict(scale=1), id="int_scale"),
        pytest.param(dict(num_splits=True), id="bool_splits"),
        pytest.param(
            dict(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int16)), id="int16"
        ),
        pytest.param(dict(q=torch.zeros(2, 4, 16).requires_grad_(True)), id="requires_grad"),
        pytest.param(dict(q=torch.nn.Parameter(torch.zeros(2, 4, 16))), id="subclass"),
        pytest.param(dict(lengths=torch.tensor([3, 20]).to("meta")), id="meta_lengths"),
        pytest.param(dict(k_pool=torch.zeros(6, 16, 2, 32)[..., ::2]), id="strided_rows"),
        pytest.param(dict(q=torch.zeros(2, 4, 1, 16)), id="4d_query"),
    ],
)
def test_other_paged_calls_take_the_full_path(change, monkeypatch):
    # Each differs from a plain call in one way the short way leaves to the full path: a
    # named torch backend, a scale or split count of another type, a table of another
    # integer type, a gradient, a subclass, a tensor off the CPU, rows not contiguous, a
    # query of another shape. With the full path made to fail, each must reach it.
    backend = change.pop("backend", "auto")
    extra = {key: change.pop(key) for key in ("scale", "num_splits") if key in change}
    _without_the_full_paged_path(monkeypatch)
    with pytest.raises(AssertionError, match="the full path ran"):
        paged_decode(**paged_args(**change), backend=backend, **extra)


# -- bad input --------------------------------------------------------------------------------


def paged_args(**change):
    args = dict(
        q=torch.zeros(2, 4, 16),
        k_pool=torch.zeros(6, 16, 2, 16),
        v_pool=torch.zeros(6, 16, 2, 16),
        block_table=torch.tensor([[0, 1], [2, 3]]),
        lengths=torch.tensor([3, 20]),
    )
    args.update(change)
    return args


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(lengths=torch.tensor([3, 33])),
            r"lengths must lie in \[0, max_blocks \* block_size = 32\], got \[3, 33\]",
        ),
        (dict(lengths=torch.tensor([-1, 4])), r"lengths must lie in \[0, .* got \[-1, 4\]"),
        (
            dict(block_table=torch.tensor([[0, 1], [2, 6]])),
            r"block_table entries in use must lie in \[0, 6\), got \[0, 6\]",
        ),
        (
            dict(block_table=torch.tensor([[-1, 1], [2, 3]])),
            r"block_table entries in use must lie in \[0, 6\), got \[-1, 3\]",
        ),
    ],
)
def test_bad_values_are_caught_even_unchecked(change, message, check):
    # The kernel reads host memory: it checks values itself, whatever `check` says.
    with pytest.raises(ValueError, match=message):
        paged_decode(**paged_args(**change), backend="cpp", check=check)


@pytest.mark.parametrize("backend", ["cpp", "auto", "torch"])
def test_a_table_of_no_columns_holds_no_token(backend):
    # (batch, 0) block tables: capacity 0, so only empty sequences pass (zeros, lse -inf),
    # and a length past 0 is named rather than read from outside the pool.
    args = paged_args(block_table=torch.zeros(2, 0, dtype=torch.long))
    out, lse = paged_decode(
        **{**args, "lengths": torch.tensor([0, 0])}, backend=backend, return_lse=True
    )
    assert (out == 0).all() and torch.isinf(lse).all()
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, .* = 0\], got \[3, 20\]"):
        paged_decode(**args, backend=backend)


def test_a_split_count_past_64_bits_is_named():
    with pytest.raises(ValueError, match=r"num_splits must be .* got 9223372036854775808"):
        paged_decode(**paged_args(), num_splits=2**63)


def test_a_limit_at_the_capacity_passes_and_one_past_it_raises():
    paged_decode(**paged_args(lengths=torch.tensor([32, 32])), backend="cpp")
    with pytest.raises(ValueError, match="lengths must lie in"):
        paged_decode(**paged_args(lengths=torch.tensor([32, 33])), backend="cpp")
    q, k = torch.zeros(1, 2, 8), torch.zeros(1, 1, 5, 8)
    decode_attention(q, k, k, torch.tensor([5]), backend="cpp")
    for backend in ("cpp", "torch"):
        with pytest.raises(ValueError, match=r"lengths must lie in \[0, n = 5\], got \[6, 6\]"):
            decode_attention(q, k, k, torch.tensor([6]), backend=backend)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            dict(
                q=torch.zeros(2, 4, 16, dtype=torch.int32),
                k_pool=torch.zeros(6, 16, 2, 16, dtype=torch.int32),
                v_pool=torch.zeros(6, 16, 2, 16, dtype=torch.int32),
            ),
            ValueError,
            "the cpp backend takes float32, float64, bfloat16 or float16, got torch.int32",
        ),
        (dict(v_pool=torch.zeros(6, 16, 3, 16)), ValueError, "k_pool and v_pool must agree"),
        (dict(k_pool=torch.zeros(6, 16, 2, 8)), ValueError, "k_pool head_dim 8 must equal"),
        (
            dict(block_table=torch.zeros(3, 2, dtype=torch.long)),
            ValueError,
            r"block_table must be integer \(batch=2, max_blocks\), got torch.int64 \(3, 2\)",
        ),
        (
            dict(lengths=torch.tensor([3, 20, 5])),
            ValueError,
            r"lengths must be integer \(batch=2,\), got torch.int64 \(3,\)",
        ),
    ],
)
def test_bad_paged_inputs_name_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        paged_decode(**paged_args(**change), backend="cpp")


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(q=torch.zeros(2, 4, 2, 16)), ValueError, r"q must be \(batch, heads, head_dim\)"),
        (dict(q=[1.0]), TypeError, "q must be a tensor, got list"),
        (dict(k=torch.zeros(2, 2, 16)), ValueError, r"k must be \(batch, kv_heads, n, dim\)"),
        (dict(v=torch.zeros(2, 2, 9, 16)), ValueError, r"k and v must agree on .* \(2, 2, 10\)"),
        (dict(q=torch.zeros(3, 4, 16)), ValueError, "k's batch 2 must equal q's batch 3"),
        (dict(q=torch.zeros(2, 3, 16)), ValueError, r"heads \(3\) must be a multiple of kv_heads"),
        (dict(k=torch.zeros(2, 2, 10, 8)), ValueError, "k's head_dim 8 must equal q's head_dim"),
        (
            dict(v=torch.zeros(2, 2, 10, 16, dtype=torch.float64)),
            ValueError,
            "v must match q's dtype",
        ),
        (dict(lengths=torch.tensor([1.0, 2.0])), ValueError, "lengths must be integer"),
        (dict(lengths=torch.tensor([1, 2, 3])), ValueError, r"lengths must be integer \(batch=2"),
        (dict(backend="triton"), ValueError, r"backend must be one of \('auto', 'cpp', 'torch'\)"),
        (dict(num_splits=0), ValueError, "num_splits must be a positive integer or None, got 0"),
        (
            dict(
                q=torch.zeros(2, 4, 16, dtype=torch.int64),
                k=torch.zeros(2, 2, 10, 16, dtype=torch.int64),
                v=torch.zeros(2, 2, 10, 16, dtype=torch.int64),
            ),
            ValueError,
            "the cpp backend takes float32, float64, bfloat16 or float16, got torch.int64",
        ),
    ],
)
def test_bad_contiguous_inputs_name_the_argument(change, error, message):
    args = dict(q=torch.zeros(2, 4, 16), k=torch.zeros(2, 2, 10, 16), v=torch.zeros(2, 2, 10, 16))
    options = {key: change.pop(key) for key in ("backend", "num_splits") if key in change}
    args.update(change)
    with pytest.raises(error, match=message):
        decode_attention(**args, **{"backend": "cpp", **options})
