"""paged_decode with a sliding window (and sinks): each query sees only its sequence's last
`window` tokens and first `sinks`, and no backend reads a block table entry outside them.

Oracle: test_paged_decode's float64 `oracle`, which fetches exactly those tokens one by one
through the block table. Tolerances as in test_paged_decode (torch path in float64 1e-12,
triton float32 2e-5) and test_cpu_decode (cpp: float64 1e-12, float32 within 2x the torch
path's error + 4 eps). The triton kernel runs in Triton's interpreter without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cpu_decode import _without_the_full_paged_path, check_paged, in_runs
from test_paged_decode import DEVICE, make_problem, oracle

from attnkit.ops import cpu_decode
from attnkit.ops.paged_decode import paged_decode

# (window, sinks): narrower than a block, a block and a bit, sinks inside and past the
# window's start, a window longer than every sequence, a window of one token
WINDOWS = [(5, 0), (21, 0), (7, 3), (13, 40), (1000, 2), (1, 0), (1, 1)]
LENGTHS = [1, 37, 0, 64, 200]


def needs_kernel():
    if not cpu_decode.cpu_decode_available():
        pytest.skip(f"C++ decode kernel unavailable: {cpu_decode.cpu_decode_unavailable_reason()}")


def junk_outside(table, lens, block_size, window, sinks, junk):
    """`table` with every entry the window and sinks never touch set to `junk`."""
    table = table.clone()
    for b, n in enumerate(lens.tolist()):
        for j in range(table.shape[1]):
            first, last = j * block_size, (j + 1) * block_size - 1
            if first >= n or (last < n - window and first >= sinks):
                table[b, j] = junk
    return table


@pytest.mark.parametrize(("window", "sinks"), WINDOWS, ids=str)
@pytest.mark.parametrize("block_size", [16, 5])
def test_torch_path_in_float64_is_the_definition(window, sinks, block_size):
    q, k, v, table, lens = make_problem(6, 2, 33, 17, LENGTHS, block_size, dtype=torch.float64)
    out, lse = paged_decode(
        q, k, v, table, lens, backend="torch", window=window, sinks=sinks, return_lse=True
    )
    want, want_lse = oracle(q, k, v, table, lens, 1 / math.sqrt(33), window, sinks)
    assert (out - want).abs().max() < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert (lse[finite] - want_lse[finite]).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize(("window", "sinks"), WINDOWS, ids=str)
@pytest.mark.parametrize("block_size", [16, 5])
def test_cpp_kernel_matches_the_oracle(window, sinks, block_size, num_splits, dtype):
    needs_kernel()
    q, k, v, table, lens = make_problem(9, 3, 64, 64, LENGTHS, block_size, dtype=dtype, seed=3)
    check_paged(q, k, v, table, lens, num_splits=num_splits, window=window, sinks=sinks)


@pytest.mark.parametrize("num_splits", [None, 2])
@pytest.mark.parametrize(("window", "sinks"), WINDOWS, ids=str)
def test_triton_kernel_matches_the_oracle(window, sinks, num_splits):
    q, k, v, table, lens = make_problem(8, 2, 16, 24, LENGTHS, 5, seed=4)
    args = [t.to(DEVICE) for t in (q, k, v, table, lens)]
    out, lse = paged_decode(
        *args, backend="triton", num_splits=num_splits, window=window, sinks=sinks,
        return_lse=True,
    )  # fmt: skip
    want, want_lse = oracle(q, k, v, table, lens, 0.25, window, sinks)
    assert (out.cpu().double() - want).abs().max() < 2e-5
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert (lse.cpu().double()[finite] - want_lse[finite]).abs().max() < 2e-5


@pytest.mark.parametrize("junk", [-1, 10**9])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_entries_outside_the_window_and_sinks_are_never_read(backend, junk):
    # What a PagedCache with a window leaves in its tables: blocks it gave back.
    if backend == "cpp":
        needs_kernel()
    window, sinks, bs = 9, 2, 4
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [3, 40, 27], bs, seed=6)
    holed = junk_outside(table, lens, bs, window, sinks, junk)
    assert (holed == junk).sum() > (table == -1).sum()  # some blocks in use were cut
    want, _ = oracle(q, k, v, table, lens, 0.25, window, sinks)
    device = DEVICE if backend == "triton" else "cpu"
    out = paged_decode(
        *(t.to(device) for t in (q, k, v, holed, lens)), backend=backend, window=window,
        sinks=sinks,
    )  # fmt: skip
    assert (out.cpu().double() - want).abs().max() < 2e-5


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_a_plain_windowed_call_takes_the_short_way(backend, monkeypatch):
    needs_kernel()
    q, k, v, table, lens = make_problem(9, 3, 64, 64, [70, 1, 0, 33], 16, seed=7)
    want = cpu_decode.cpp_decode(q, k, v, table, lens, 0.125, None, window=20, sinks=4)
    _without_the_full_paged_path(monkeypatch)
    out, lse = paged_decode(
        q, k, v, table, lens, backend=backend, window=20, sinks=4, return_lse=True
    )
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


@pytest.mark.parametrize(
    ("window", "sinks", "message"),
    [
        (0, 0, r"window must be an integer in \[1, 2\*\*63\) or None, got 0"),
        (True, 0, r"window must be an integer in \[1, 2\*\*63\) or None, got True"),
        (2.5, 0, r"window must be an integer in \[1, 2\*\*63\) or None, got 2.5"),
        (4, -1, r"sinks must be an integer in \[0, 2\*\*63\), got -1"),
        (4, 1.0, r"sinks must be an integer in \[0, 2\*\*63\), got 1.0"),
        (None, 2, r"sinks=2 needs a window"),
        (2**63, 0, r"window must be an integer in \[1, 2\*\*63\) or None, got 9223372036854775808"),
        (4, 2**63, r"sinks must be an integer in \[0, 2\*\*63\), got 9223372036854775808"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "torch", "cpp"])
def test_bad_windows_name_the_argument(window, sinks, message, backend):
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [3, 20], 16)
    with pytest.raises(ValueError, match=message):
        paged_decode(q, k, v, table, lens, backend=backend, window=window, sinks=sinks)


def test_numpy_integers_serve_as_window_and_sinks():
    q, k, v, table, lens = make_problem(4, 2, 16, 16, [3, 40], 4, dtype=torch.float64)
    want = paged_decode(q, k, v, table, lens, backend="torch", window=9, sinks=2)
    for backend in ("auto", "cpp", "torch"):
        got = paged_decode(
            q, k, v, table, lens, backend=backend, window=np.int64(9), sinks=np.int32(2)
        )
        assert (got - want).abs().max() < 1e-12, backend


@st.composite
def windowed_problems(draw):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.integers(1, 8))
    d = draw(st.integers(1, 70))
    block_size = draw(st.sampled_from([1, 3, 16, 48]))
    lengths = draw(st.lists(st.integers(0, 600), min_size=1, max_size=4))
    window = draw(st.integers(1, 700))
    sinks = draw(st.sampled_from([0, 0, 1, 4, draw(st.integers(0, 700))]))
    splits = draw(st.sampled_from([None, 1, 2, 5]))
    seed = draw(st.integers(0, 2**16))
    runs = draw(st.booleans())
    return kv_heads * group, kv_heads, d, lengths, block_size, window, sinks, splits, seed, runs


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windowed_problems())
def test_any_windowed_problem_matches_the_oracle(problem):
    needs_kernel()
    h, kvh, d, lengths, block_size, window, sinks, splits, seed, runs = problem
    q, k, v, table, lens = make_problem(
        h, kvh, d, d, lengths, block_size, dtype=torch.float64, seed=seed
    )
    if runs:
        table = in_runs(table, lens, block_size, k.shape[0], seed)
    table = junk_outside(table, lens, block_size, window, sinks, -1)
    check_paged(q, k, v, table, lens, num_splits=splits, window=window, sinks=sinks)
