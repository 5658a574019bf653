"""Properties every backend keeps: causality, GQA = expanded MHA, lse merging, empty rows,
NaN isolation, determinism, strided inputs, O(N) memory for `tiled`, and `auto`'s choices."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attn_testing import max_err, random_qkv, returns_lse
from attnkit import masks
from attnkit.ops import cpp_build
from attnkit.ops.backends import GatheredBackend, TiledBackend
from attnkit.ops.backends.banded import SOURCE as BANDED_SOURCE
from attnkit.ops.cpp_build import load_kernel
from attnkit.tools.measure import peak_bytes

ALL = ["reference", "tiled", TiledBackend(5, 7), "sdpa", "gathered", GatheredBackend(6)] + (
    ["flex"] if "flex" in attnkit.available_backends() else []
)
ALL_IDS = ["reference", "tiled", "tiled-5x7", "sdpa", "gathered", "gathered-6"] + (
    ["flex"] if "flex" in attnkit.available_backends() else []
)
NO_LSE = ("sdpa", "gathered", "gathered-6")  # torch SDPA returns no log-sum-exp
WITH_LSE = [b for b, i in zip(ALL, ALL_IDS, strict=True) if i not in NO_LSE]
WITH_LSE_IDS = [i for i in ALL_IDS if i not in NO_LSE]


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("mask", [masks.causal(), masks.sliding_window(4) | masks.sinks(2)])
def test_causality_future_tokens_do_not_change_the_past(backend, mask):
    gen = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(gen, n_q=23, n_k=23)
    t = 13
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, t:] = torch.randn(q2[:, :, t:].shape, generator=gen)
    k2[:, :, t:] = torch.randn(k2[:, :, t:].shape, generator=gen) * 5
    v2[:, :, t:] = torch.randn(v2[:, :, t:].shape, generator=gen) * 5
    before = attnkit.attention(q, k, v, mask, backend=backend)
    after = attnkit.attention(q2, k2, v2, mask, backend=backend)
    assert torch.equal(before[:, :, :t], after[:, :, :t])
    assert not torch.equal(before[:, :, t:], after[:, :, t:])  # the test can fail


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("kv_heads", [1, 3])
def test_gqa_equals_mha_with_repeated_kv(backend, kv_heads):
    gen = torch.Generator().manual_seed(kv_heads)
    q, k, v = random_qkv(gen, heads=9, kv_heads=kv_heads, n_q=17, n_k=30, dtype=torch.float64)
    grouped = attnkit.attention(q, k, v, masks.causal(), backend=backend)
    group = 9 // kv_heads  # query head i uses KV head i // group
    expanded = attnkit.attention(
        q,
        k.repeat_interleave(group, 1),
        v.repeat_interleave(group, 1),
        masks.causal(),
        backend=backend,
    )
    assert max_err(grouped, expanded) < 1e-12


@pytest.mark.parametrize("backend", WITH_LSE, ids=WITH_LSE_IDS)
@pytest.mark.parametrize("split", [1, 20, 39])
def test_lse_merge_of_two_key_halves_equals_all_keys(backend, split):
    gen = torch.Generator().manual_seed(split)
    q, k, v = random_qkv(gen, n_q=11, n_k=40, dtype=torch.float64)
    dense = torch.rand(2, 1, 11, 40, generator=gen) < 0.5  # any mask, split by columns
    dense[0, 0, 3] = False  # one row sees nothing at all
    dense[1, 0, 4, split:] = False  # one row sees only the first part

    def part(lo: int, hi: int):
        return attnkit.attention(
            q,
            k[:, :, lo:hi],
            v[:, :, lo:hi],
            dense[..., lo:hi],
            backend=backend,
            return_lse=True,
            softcap=4.0,
        )

    out, lse = attnkit.merge_attention([part(0, split), part(split, 40)])
    want, want_lse = attnkit.attention(
        q, k, v, dense, backend="reference", return_lse=True, softcap=4.0
    )
    assert max_err(out, want) < 1e-12 and max_err(lse, want_lse) < 1e-12
    assert lse[0, :, 3].eq(-math.inf).all() and out[0, :, 3].eq(0).all()


def test_merge_attention_rejects_no_parts():
    with pytest.raises(ValueError, match="at least one"):
        attnkit.merge_attention([])


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
def test_fully_masked_rows_give_zero_output_minus_inf_lse_and_zero_gradient(backend):
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, n_q=6, n_k=4, dtype=torch.float64)
    q.requires_grad_(backend != "flex")  # FlexAttention has no backward on CPU
    # 6 queries over 4 keys, bottom-right aligned: rows 0 and 1 sit before key 0.
    wants_lse = returns_lse(backend)
    result = attnkit.attention(q, k, v, masks.causal(), backend=backend, return_lse=wants_lse)
    out = result[0] if wants_lse else result
    assert out[:, :, :2].eq(0).all() and not torch.isnan(out).any()
    if wants_lse:
        assert result[1][:, :, :2].eq(-math.inf).all() and torch.isfinite(result[1][:, :, 2:]).all()
    if not q.requires_grad:
        return
    out.sum().backward()
    assert q.grad[:, :, :2].eq(0).all() and torch.isfinite(q.grad).all()
    assert q.grad[:, :, 2:].abs().sum() > 0


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
def test_nan_keys_behind_a_mask_hiding_everything_do_not_leak_under_autograd(backend):
    # Regression: the all-masked shortcut kept autograd attached with 0 * k.sum() = NaN.
    gen = torch.Generator().manual_seed(6)
    q, k, v = random_qkv(gen, n_q=3, n_k=4, dtype=torch.float64)
    k[:, :, 1], v[:, :, 2] = math.nan, math.nan
    q.requires_grad_(backend != "flex")
    out = attnkit.attention(q, k, v, masks.padding([0, 0]), backend=backend)
    assert out.eq(0).all()
    if q.requires_grad:
        out.sum().backward()
        assert q.grad.eq(0).all()


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
def test_zero_length_queries_and_keys_have_defined_results(backend):
    gen = torch.Generator().manual_seed(2)
    q, k, v = random_qkv(gen, n_q=0, n_k=5, v_head_dim=3)
    assert attnkit.attention(q, k, v, masks.causal(), backend=backend).shape == (2, 9, 0, 3)
    q, k, v = random_qkv(gen, n_q=4, n_k=0, v_head_dim=3)
    out = attnkit.attention(q, k, v, backend=backend)
    assert out.shape == (2, 9, 4, 3) and out.eq(0).all()
    # One sequence of the batch has no keys at all, the other has all of them.
    q, k, v = random_qkv(gen, n_q=4, n_k=6)
    out = attnkit.attention(q, k, v, masks.padding([0, 6]), backend=backend)
    assert out[0].eq(0).all() and max_err(out[1:], attnkit.attention(q[1:], k[1:], v[1:])) < 1e-6


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
@pytest.mark.parametrize(
    ("mask", "n_q", "q_offset"),
    [(masks.sliding_window(8), 5, None), (masks.causal(), 5, 10)],
    ids=["decode-window", "q_offset-unused-cache-slots"],
)
def test_nan_in_keys_no_query_sees_does_not_leak(backend, mask, n_q, q_offset):
    """Regression: flex used to let NaN in hidden keys (old window keys, unused cache
    slots past the queries) reach the output."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = random_qkv(gen, n_q=n_q, n_k=40)
    clean = attnkit.attention(q, k, v, mask, backend=backend, q_offset=q_offset)
    seen = mask.dense(n_q, 40, q_offset)[0, 0].any(0)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, ~seen], v_bad[:, :, ~seen] = math.nan, math.nan
    assert (~seen).any()
    assert torch.equal(
        clean, attnkit.attention(q, k_bad, v_bad, mask, backend=backend, q_offset=q_offset)
    )


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("left", [False, True])
def test_nan_in_padded_key_slots_does_not_leak(backend, left):
    gen = torch.Generator().manual_seed(9)
    q, k, v = random_qkv(gen, n_q=5, n_k=12)
    lengths = torch.tensor([7, 12])
    pad = masks.padding(lengths, left=left)
    clean = attnkit.attention(q, k, v, pad, backend=backend)
    k_bad, v_bad = k.clone(), v.clone()
    padded = slice(0, 5) if left else slice(7, 12)
    k_bad[0, :, padded], v_bad[0, :, padded] = math.nan, math.inf
    dirty = attnkit.attention(q, k_bad, v_bad, pad, backend=backend)
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
def test_repeated_runs_are_bitwise_identical(backend):
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(gen, n_q=50, n_k=70)
    mask = masks.sliding_window(16)
    assert torch.equal(
        attnkit.attention(q, k, v, mask, backend=backend),
        attnkit.attention(q, k, v, mask, backend=backend),
    )


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
def test_non_contiguous_inputs_work(backend):
    gen = torch.Generator().manual_seed(6)
    # (batch, seq, heads, dim) storage viewed as (batch, heads, seq, dim), as projections give.
    q = torch.randn(2, 19, 9, 24, generator=gen).transpose(1, 2)
    k = torch.randn(2, 19, 3, 24, generator=gen).transpose(1, 2)
    v = torch.randn(2, 19, 3, 48, generator=gen)[..., ::2].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    got = attnkit.attention(q, k, v, masks.causal(), backend=backend)
    want = attnkit.attention(
        q.contiguous(), k.contiguous(), v.contiguous(), masks.causal(), backend="reference"
    )
    assert max_err(got, want) < 1e-5


def test_tiled_float16_does_not_overflow_where_a_naive_softmax_would():
    gen = torch.Generator().manual_seed(8)
    q, k, v = random_qkv(gen, n_q=16, n_k=16, head_dim=64)
    q, k, v = (q * 60).half(), (k * 60).half(), v.half()  # |q·k| reaches past 65504
    naive = q @ k.repeat_interleave(3, 1).transpose(-1, -2)
    assert torch.isinf(naive).any()  # the inputs really overflow a float16 softmax
    got = attnkit.attention(q, k, v, masks.causal(), backend="tiled")
    want = attnkit.attention(q.double(), k.double(), v.double(), masks.causal())
    assert torch.isfinite(got).all()
    assert max_err(got, want) < 2e-2  # float16 output resolution at values of order 1-3


def test_tiled_peak_memory_grows_linearly_while_reference_grows_quadratically():
    def peak(backend, n: int) -> int:
        q = torch.randn(1, 4, n, 32)
        return peak_bytes(lambda: attnkit.attention(q, q, q, masks.causal(), backend=backend))

    small, large = 1024, 4096  # 4x the length
    tiled_growth = peak("tiled", large) / peak("tiled", small)
    reference_growth = peak("reference", large) / peak("reference", small)
    assert tiled_growth <= 4.0, f"tiled peak grew {tiled_growth:.1f}x for 4x the length"
    assert reference_growth >= 10.0  # the measurement does see quadratic growth
    scores_bytes = 4 * large * large * 4  # one float32 score matrix, 4 heads
    assert peak("tiled", large) < scores_bytes / 8


def test_auto_does_not_pick_tiled_when_per_sequence_masks_leave_nothing_to_skip():
    """Regression: auto averaged tile density over the batch, but tiled skips a tile only
    when it is empty for every sequence; four sequences keeping different quarters of the
    keys left tiled nothing to skip (and 3x slower than sdpa)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(gen, batch=4, n_q=2048, n_k=2048, head_dim=8)
    blocks = 2048 // 128
    layout = torch.zeros(4, blocks, blocks, dtype=torch.bool)
    for b in range(4):
        layout[b, :, b * blocks // 4 : (b + 1) * blocks // 4] = True
    problem = attnkit.ops.problem.make_problem(
        q, k, v, masks.block_sparse(layout, 128), None, None, None, False
    )
    assert attnkit.choose_backend(problem).name == "sdpa"


@pytest.mark.parametrize("backend", ["reference", "tiled", "sdpa"])
def test_a_problem_where_nothing_is_visible_still_backpropagates_zero(backend):
    """Regression: the all-masked shortcut returned zeros detached from autograd."""
    gen = torch.Generator().manual_seed(12)
    q, k, v = (t.requires_grad_(True) for t in random_qkv(gen, n_q=3, n_k=4))
    out = attnkit.attention(q, k, v, masks.padding([0, 0]), backend=backend)
    out.sum().backward()
    assert out.eq(0).all() and all(t.grad.eq(0).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", ALL, ids=ALL_IDS)
def test_batch_of_zero_sequences_gives_an_empty_result(backend):
    """Regression: tiled failed to reshape a batch of 0."""
    q, k, v = random_qkv(torch.Generator().manual_seed(13), batch=0, n_q=5, n_k=5)
    out = attnkit.attention(q, k, v, masks.causal(), backend=backend)
    assert out.shape == (0, 9, 5, 16)


@pytest.mark.parametrize("backend", WITH_LSE, ids=WITH_LSE_IDS)
def test_lse_is_float32_for_half_inputs_on_every_backend(backend):
    q, k, v = random_qkv(torch.Generator().manual_seed(14), n_q=4, n_k=6, dtype=torch.bfloat16)
    _, lse = attnkit.attention(q, k, v, masks.causal(), backend=backend, return_lse=True)
    assert lse.dtype == torch.float32


def test_auto_picks_banded_for_bands_gathered_for_sparse_tiled_for_lse_and_sdpa_for_dense():
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(gen, batch=1, n_q=4096, n_k=4096, head_dim=8)
    problem = attnkit.ops.problem.make_problem

    def chosen(mask, inputs=(q, k, v), **kw):
        args = dict(scale=None, softcap=None, q_offset=None, return_lse=False) | kw
        return attnkit.choose_backend(problem(*inputs, mask, **args)).name

    window = masks.sliding_window(512)
    assert chosen(window) == "banded"
    assert chosen(window | masks.sinks(4)) == "banded"
    assert chosen(window, tuple(t.double() for t in (q, k, v))) == "gathered"  # kernel: float32
    assert chosen(masks.causal() & masks.document(torch.arange(4096) // 512)) == "gathered"
    assert chosen(window, return_lse=True) == "tiled"
    assert chosen(masks.causal(), tuple(t.double() for t in (q, k, v))) == "sdpa"
    assert chosen(masks.padding([4000])) == "sdpa"  # dense: nothing to skip
    assert chosen(None) == "sdpa"
    assert chosen(masks.causal(), return_lse=True) == "tiled"
    assert chosen(masks.causal(), softcap=20.0) == "tiled"
    small = tuple(t[:, :, :64] for t in (q, k, v))
    assert chosen(masks.causal() & masks.strided(8), small) == "sdpa"  # too small to tile


@pytest.mark.parametrize(
    ("vector_kernels", "heads", "kv_heads", "blocks_of_rows", "expected"),
    [
        (True, 8, 2, None, "banded"),  # prefill, 4096 rows: a causal mask is the window n_k
        (True, 8, 2, 1 / 4, "banded"),  # a chunk against a cache: rows x 4 heads fill a block
        (True, 8, 8, 1 / 2, "sdpa"),  # ungrouped heads filling half a block: SDPA wins
        (True, 8, 8, 1, "banded"),
        (False, 8, 2, None, "sdpa"),  # not timed against SDPA without AVX-512 or AVX2
    ],
)
def test_auto_takes_banded_for_causal_only_where_it_was_measured_faster(
    monkeypatch, vector_kernels, heads, kv_heads, blocks_of_rows, expected
):
    block_rows = load_kernel(BANDED_SOURCE).BLOCK_ROWS  # 32 with AVX-512, 16 with AVX2
    monkeypatch.setattr(cpp_build, "has_wide_vectors", lambda: vector_kernels)
    n_q = 4096 if blocks_of_rows is None else int(block_rows * blocks_of_rows)
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen, 1, heads, kv_heads, n_q=n_q, n_k=4096, head_dim=8)
    problem = attnkit.ops.problem.make_problem(q, k, v, masks.causal(), None, None, None, False)
    assert attnkit.choose_backend(problem).name == expected


def test_flex_declines_gradients_on_cpu_when_named():
    if "flex" not in attnkit.available_backends():
        pytest.skip("this torch has no FlexAttention")
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="'flex' cannot serve.*no backward pass on CPU"):
        attnkit.attention(q, q, q, backend="flex")
