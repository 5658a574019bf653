"""paged_decode: attention read through a block table equals attention over the gathered keys.

The float64 oracle below is written from the definition, token by token through the block
table. The `triton` backend runs its real kernel: on CUDA where there is one, otherwise in
Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), so
its indexing, masking, online softmax and split merging are checked in CI on CPU. Its GPU
speed is measured in benchmarks/gpu_paged_decode.py (results in benchmarks/RESULTS.md).

Tolerances: float64 torch path 1e-12; float32 kernel vs float64 oracle 2e-5 (float32
accumulation over up to ~200 keys); half-precision kernel 2e-2 (inputs rounded
to 8 or 11 bits).
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.cache.paged import PagedCache
from attnkit.ops import paged_decode as paged_module
from attnkit.ops.paged_decode import paged_decode


def test_the_triton_kernel_is_importable():
    # triton is a dev dependency: without it the kernel tests below would test nothing
    assert paged_module.triton_paged_decode is not None


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_problem(
    heads, kv_heads, d, dv, lengths, block_size, *, dtype=torch.float32, seed=0, pad=-1
):
    """A shuffled block pool, a block table per sequence (padding entries = `pad`)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    needed = [-(-int(n) // block_size) for n in lengths]
    num_blocks = sum(needed) + 3  # a few blocks nobody uses
    order = torch.randperm(num_blocks, generator=g).tolist()
    width = max(1, max(needed))
    table = torch.full((len(lengths), width), pad, dtype=torch.int32)
    for b, n in enumerate(needed):
        table[b, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    q = torch.randn(len(lengths), heads, d, generator=g, dtype=torch.float64)
    k = torch.randn(num_blocks, block_size, kv_heads, d, generator=g, dtype=torch.float64)
    v = torch.randn(num_blocks, block_size, kv_heads, dv, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), table, lengths


def oracle(q, k_pool, v_pool, table, lengths, scale, window=None, sinks=0):
    """softmax(q·k / s)·v per sequence and head, keys fetched token by token, float64; with
    a window, only the last `window` tokens and the first `sinks`."""
    q, k_pool, v_pool = q.double().cpu(), k_pool.double().cpu(), v_pool.double().cpu()
    b, h, _ = q.shape
    bs, kv_heads = k_pool.shape[1], k_pool.shape[2]
    out = torch.zeros(b, h, v_pool.shape[-1], dtype=torch.float64)
    lse = torch.full((b, h), -math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        if n == 0:
            continue
        seen = [t for t in range(n) if window is None or t >= n - window or t < sinks]
        places = [(int(table[i, t // bs]), t % bs) for t in seen]
        keys = torch.stack([k_pool[blk, slot] for blk, slot in places])  # (seen, Hkv, d)
        vals = torch.stack([v_pool[blk, slot] for blk, slot in places])
        for head in range(h):
            kv = head // (h // kv_heads)
            scores = keys[:, kv] @ q[i, head] * scale
            lse[i, head] = torch.logsumexp(scores, 0)
            out[i, head] = torch.softmax(scores, 0) @ vals[:, kv]
    return out, lse


SHAPES = [  # (heads, kv_heads, d, dv): MHA, SmolLM2's GQA 9/3, MQA 8/1, odd dims, dv != d
    (4, 4, 16, 16),
    (9, 3, 64, 64),
    (8, 1, 40, 24),
    (6, 2, 33, 17),
]
LENGTHS = [[1, 37, 0, 64, 200], [5], [16, 16, 17]]


@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_path_in_float64_is_the_definition(shape, lengths, block_size):
    h, kvh, d, dv = shape
    q, k, v, table, lens = make_problem(h, kvh, d, dv, lengths, block_size, dtype=torch.float64)
    out, lse = paged_decode(q, k, v, table, lens, backend="torch", return_lse=True)
    want, want_lse = oracle(q, k, v, table, lens, 1 / math.sqrt(d))
    assert (out - want).abs().max() < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))  # empty rows: -inf
    finite = torch.isfinite(want_lse)
    assert (lse[finite] - want_lse[finite]).abs().max() < 1e-12


@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_kernel_matches_the_oracle(shape, lengths, block_size, num_splits):
    h, kvh, d, dv = shape
    q, k, v, table, lens = make_problem(h, kvh, d, dv, lengths, block_size, seed=1)
    q, k, v, table, lens = (t.to(DEVICE) for t in (q, k, v, table, lens))
    out, lse = paged_decode(
        q, k, v, table, lens, backend="triton", num_splits=num_splits, return_lse=True
    )
    want, want_lse = oracle(q, k, v, table, lens, 1 / math.sqrt(d))
    assert out.dtype == torch.float32 and out.shape == want.shape
    assert (out.cpu().double() - want).abs().max() < 2e-5
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(want_lse))
    assert not torch.isnan(out).any()
    finite = torch.isfinite(want_lse)
    assert (lse.cpu().double()[finite] - want_lse[finite]).abs().max() < 2e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_kernel_in_half_precision(dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip(
            "Triton 3.9's interpreter multiplies bfloat16 tiles wrongly (a 16x16 tl.dot is "
            "off by 1e10 on CPU); the same code path runs here in float16, and in bfloat16 "
            "on the GPU (benchmarks/RESULTS.md)"
        )
    q, k, v, table, lens = make_problem(8, 2, 64, 64, [70, 3, 129], 16, seed=2)
    want, _ = oracle(q, k, v, table, lens, 0.125)
    args = [t.to(DEVICE) for t in (q, k, v)]
    args = [t.to(dtype) for t in args] + [table.to(DEVICE), lens.to(DEVICE)]
    out = paged_decode(*args, backend="triton", num_splits=2)
    assert out.dtype == dtype
    assert (out.cpu().double() - want).abs().max() < 2e-2


@torch.no_grad()
def test_reads_a_real_paged_cache_in_place():
    """Sequences written through PagedCache (shared prefix, forks, ragged lengths) decode
    the same through the block table as through the cache's gathered views."""
    kvh, d, h = 2, 16, 6
    cache = PagedCache(1, kvh, d, num_blocks=40, block_size=4, seed=3)
    g = torch.Generator().manual_seed(4)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (9, 1, 14), strict=True):
        cache.prepare([seq], n)
        kv = torch.randn(2, 1, kvh, n, d, generator=g)
        cache.update(0, kv[0], kv[1])
    seqs.append(cache.fork(seqs[0]))  # shares blocks copy-on-write
    step = cache.prepare(seqs, 1)
    new = torch.randn(2, len(seqs), kvh, 1, d, generator=g)
    k_view, v_view = cache.update(0, new[0], new[1])  # (B, Hkv, kv_len, d), padded
    q = torch.randn(len(seqs), h, d, generator=g)
    lengths = torch.tensor([cache.length(s) for s in seqs])
    from attnkit import attention
    from attnkit.ops.masks import padding

    want = attention(q.unsqueeze(2), k_view, v_view, padding(lengths), backend="reference")
    for backend in ("torch", "triton"):
        args = (q, cache.k_pool[0], cache.v_pool[0], step.block_table, lengths)
        got = paged_decode(*(t.to(DEVICE) for t in args), backend=backend)
        assert (got.cpu() - want.squeeze(2)).abs().max() < 1e-5, backend


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(q=torch.zeros(2, 4, 1, 16)), ValueError, r"q must be \(batch, heads, head_dim\)"),
        (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'torch'"),
        (dict(num_splits=0), ValueError, "num_splits must be a positive integer or None, got 0"),
        (dict(q=torch.zeros(2, 3, 16)), ValueError, r"heads \(3\) must be a multiple of kv_heads"),
        (
            dict(lengths=torch.tensor([3, 99])),
            ValueError,
            r"lengths must lie in \[0, max_blocks \* block_size = 32\], got \[3, 99\]",
        ),
        (dict(lengths=torch.tensor([3.0, 4.0])), ValueError, "lengths must be integer"),
        (
            dict(block_table=torch.tensor([[0, 1], [2, 50]])),
            ValueError,
            r"block_table entries in use must lie in \[0, 6\)",
        ),
        (dict(k_pool=torch.zeros(6, 16, 2, 8)), ValueError, "k_pool head_dim 8 must equal"),
        (
            dict(v_pool=torch.zeros(6, 16, 2, 16, dtype=torch.float64)),
            ValueError,
            "v_pool must match q's dtype",
        ),
        (dict(block_table=[[0, 1], [2, 3]]), TypeError, "block_table must be a tensor, got list"),
        (
            dict(
                backend="triton",
                q=torch.zeros(2, 4, 16, dtype=torch.float64),
                k_pool=torch.zeros(6, 16, 2, 16, dtype=torch.float64),
                v_pool=torch.zeros(6, 16, 2, 16, dtype=torch.float64),
            ),
            ValueError,
            "triton kernels take float32, float16 or bfloat16, got torch.float64",
        ),
    ],
)
def test_bad_inputs_name_the_argument(change, error, message):
    args = dict(
        q=torch.zeros(2, 4, 16),
        k_pool=torch.zeros(6, 16, 2, 16),
        v_pool=torch.zeros(6, 16, 2, 16),
        block_table=torch.tensor([[0, 1], [2, 3]]),
        lengths=torch.tensor([3, 20]),
    )
    options = {key: change.pop(key) for key in ("backend", "num_splits") if key in change}
    args.update(change)
    with pytest.raises(error, match=message):
        paged_decode(**args, **options)


def test_padding_entries_of_short_rows_are_never_read():
    # Row 0 needs one block; its second entry is junk (-1) and must not be dereferenced.
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [3, 20], 16, pad=-1)
    assert int(table[0, 1]) == -1
    want, _ = oracle(q, k, v, table, lens, 0.25)
    for backend in ("torch", "triton"):
        out = paged_decode(*(t.to(DEVICE) for t in (q, k, v, table, lens)), backend=backend)
        assert (out.cpu().double() - want).abs().max() < 2e-5, backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_calls_give_the_same_answer(backend):
    # check=False skips only the value checks (the device sync), never the arithmetic.
    q, k, v, table, lens = make_problem(9, 3, 64, 64, [70, 0, 129], 16, seed=5)
    args = [t.to(DEVICE) for t in (q, k, v, table, lens)]
    checked = paged_decode(*args, backend=backend, return_lse=True)
    unchecked = paged_decode(*args, backend=backend, return_lse=True, check=False)
    assert torch.equal(checked[0], unchecked[0]) and torch.equal(checked[1], unchecked[1])


def test_triton_on_cpu_tensors_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [3, 20], 16)
    with pytest.raises(ValueError, match=r"need CUDA tensors \(got cpu\), or TRITON_INTERPRET=1"):
        paged_decode(q, k, v, table, lens, backend="triton")
