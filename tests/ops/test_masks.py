"""Masks: dense truth against plain-Python definitions, and block summaries that are sound.

Each leaf mask is built together with `pred(b, row, i, j)`, its definition written from the
docstrings (row `row` of batch `b` sits at absolute position `i`; key `j` at `j`). The same
builder draws its parameters from hypothesis or from a seeded `random.Random`.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnkit import masks as M
from attnkit.ops.masks import Geometry

KINDS = [
    "causal", "sliding_window", "chunked", "strided", "sinks",
    "prefix_lm", "padding", "document", "block_sparse", "from_tensor",
]  # fmt: skip
# Leaves whose summary is exact in both views (strided too: a tile of two or more entries
# spans consecutive distances, so it is full only at stride 1). Document: `full` only.
EXACT = [k for k in KINDS if k != "document"]
LONG, BOOL = torch.long, torch.bool


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- plain-Python definitions -------------------------------------------------------------
def make_leaf(kind, pick, batch, geo):
    """(mask, pred): a `kind` mask with parameters from `pick(lo, hi)`, and its definition."""
    n_q, n_k, off = geo.n_q, geo.n_k, geo.q_offset
    g = torch.Generator().manual_seed(pick(0, 2**31))
    rows = batch if pick(0, 1) else 1  # per-batch tensor or one shared by every sequence

    def bits(*shape):  # random booleans with a drawn density, all-False and all-True included
        return torch.rand(*shape, generator=g) < pick(0, 4) / 4

    if kind == "causal":
        return M.causal(), lambda b, r, i, j: j <= i
    if kind == "sliding_window":
        w = pick(1, 20)
        return M.sliding_window(w), lambda b, r, i, j: 0 <= i - j < w
    if kind == "chunked":
        c = pick(1, 20)
        return M.chunked(c), lambda b, r, i, j: i // c == j // c
    if kind == "strided":
        s = pick(1, 8)
        return M.strided(s), lambda b, r, i, j: j <= i and (i - j) % s == 0
    if kind == "sinks":
        n = pick(0, 10)
        return M.sinks(n), lambda b, r, i, j: j < n and j <= i
    if kind == "prefix_lm":
        if pick(0, 1):
            p = pick(0, n_k + 3)
            return M.prefix_lm(p), lambda b, r, i, j: j <= i or j < p
        ps = [pick(0, n_k + 3) for _ in range(batch)]
        return M.prefix_lm(torch.tensor(ps)), lambda b, r, i, j: j <= i or j < ps[b]
    if kind == "padding":
        lens, left = [pick(0, n_k) for _ in range(rows)], bool(pick(0, 1))

        def pad(b, r, i, j):
            n = lens[b % rows]
            return j >= n_k - n if left else j < n

        return M.padding(torch.tensor(lens), left=left), pad
    if kind == "document":
        docs = pick(1, 4)
        q_ids = torch.randint(0, docs, (rows, n_q), generator=g)
        kv_ids = torch.randint(0, docs, (rows, n_k), generator=g)
        if pick(0, 1):  # packed documents are contiguous runs
            q_ids, kv_ids = q_ids.sort(-1).values, kv_ids.sort(-1).values
        if n_q == n_k and pick(0, 1):
            kv_ids = None
        q, kv = q_ids.tolist(), (q_ids if kv_ids is None else kv_ids).tolist()
        mask = M.document(q_ids[0] if rows == 1 and pick(0, 1) else q_ids, kv_ids)
        return mask, lambda b, r, i, j: q[b % rows][r] == kv[b % rows][j]
    if kind == "block_sparse":
        bs = pick(1, 16)
        need_r, need_c = max(1, -(-(off + n_q) // bs)), -(-n_k // bs)
        layout = bits(rows, need_r + pick(0, 2), need_c + pick(0, 2))
        lay = layout.tolist()
        mask = M.block_sparse(layout[0] if rows == 1 and pick(0, 1) else layout, bs)
        return mask, lambda b, r, i, j: i >= 0 and lay[b % rows][i // bs][j // bs]
    if kind == "from_tensor":
        shape = [(n_q, n_k), (rows, 1, n_q, n_k), (rows, 1, 1, n_k), (rows, 1, n_q, 1)][pick(0, 3)]
        t = bits(*shape)
        t4 = t.view((1,) * (4 - t.dim()) + tuple(shape))
        tb, tq, tk = t4.shape[0], t4.shape[2], t4.shape[3]
        lst = t4[:, 0].tolist()
        return M.from_tensor(t), lambda b, r, i, j: lst[b % tb][r % tq][j % tk]
    raise AssertionError(kind)


def reference(pred, batch, geo):
    """Dense (batch, 1, n_q, n_k) truth table of `pred`, one Python call per entry."""
    table = [
        [[bool(pred(b, r, geo.q_offset + r, j)) for j in range(geo.n_k)] for r in range(geo.n_q)]
        for b in range(batch)
    ]
    return torch.tensor(table, dtype=torch.bool).unsqueeze(1)


def tiles(dense, block_q, block_k):
    """(any, all) of each block_q x block_k tile of a (B, 1, n_q, n_k) matrix."""
    grid = [row.split(block_k, dim=2) for row in dense[:, 0].split(block_q, dim=1)]
    any_ = torch.stack([torch.stack([t.flatten(1).any(1) for t in r], -1) for r in grid], 1)
    all_ = torch.stack([torch.stack([t.flatten(1).all(1) for t in r], -1) for r in grid], 1)
    return any_, all_


def seeded_leaf(kind, seed, batch, geo):
    rng = random.Random(seed)
    return make_leaf(kind, rng.randint, batch, geo)


# -- hypothesis strategies ----------------------------------------------------------------
@st.composite
def trees(draw, depth, kinds, batch, geo):
    """(mask, pred): a random leaf, or `&`, `|`, `~` of random trees up to `depth` deep."""
    op = draw(st.sampled_from(["leaf", "leaf", "and", "or", "not"])) if depth else "leaf"
    if op == "leaf":
        kind = draw(st.sampled_from(kinds))
        return make_leaf(kind, lambda lo, hi: draw(st.integers(lo, hi)), batch, geo)
    a, pa = draw(trees(depth - 1, kinds, batch, geo))
    if op == "not":
        return ~a, lambda *x: not pa(*x)
    c, pc = draw(trees(depth - 1, kinds, batch, geo))
    if op == "and":
        return a & c, lambda *x: pa(*x) and pc(*x)
    return a | c, lambda *x: pa(*x) or pc(*x)


@st.composite
def problems(draw, depth=2, kinds=KINDS, max_n=80):
    """(mask, pred, batch, q_offset argument, geometry, block_q, block_k)."""
    n_q, n_k = draw(st.integers(1, max_n)), draw(st.integers(1, max_n))
    q_offset = draw(st.none() | st.integers(-30, 40))
    batch = draw(st.integers(2, 3))
    geo = Geometry.aligned(n_q, n_k, q_offset)
    mask, pred = draw(trees(depth, kinds, batch, geo))
    blocks = st.integers(1, 3) | st.integers(1, 33)  # small tiles often, non-divisors too
    return mask, pred, batch, q_offset, geo, draw(blocks), draw(blocks)


# -- 1. dense equals the definitions ------------------------------------------------------
GEOMETRIES = [(1, 1, None), (7, 7, None), (1, 97, None), (7, 97, None), (97, 7, None),
              (97, 97, None), (7, 7, 3), (7, 12, -4), (12, 7, 0), (1, 7, 20)]  # fmt: skip


@pytest.mark.parametrize("n_q, n_k, q_offset", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_dense_equals_definition(kind, n_q, n_k, q_offset):
    geo = Geometry.aligned(n_q, n_k, q_offset)
    for seed in range(3):
        mask, pred = seeded_leaf(kind, 1000 * seed + n_q + n_k, 3, geo)
        want = reference(pred, mask.batch_size or 1, geo)
        torch.testing.assert_close(mask.dense(n_q, n_k, q_offset), want, rtol=0, atol=0)


@examples(60)
@given(problems(depth=2, max_n=40))
def test_dense_of_random_compositions_equals_definition(problem):
    mask, pred, _, q_offset, geo, _, _ = problem
    want = reference(pred, mask.batch_size or 1, geo)
    assert torch.equal(mask.dense(geo.n_q, geo.n_k, q_offset), want)


def test_default_alignment_is_bottom_right():
    # decode: one query at the last position sees every key; window sees the last W keys
    assert M.causal().dense(1, 7).all()
    assert M.sliding_window(3).dense(1, 7)[0, 0, 0].tolist() == [False] * 4 + [True] * 3
    # more queries than keys: the first n_q - n_k rows sit before key 0 and see nothing
    d = M.causal().dense(5, 3)[0, 0]
    assert not d[:2].any() and d[2:].tolist() == [[True, False, False], [True, True, False],
                                                  [True, True, True]]  # fmt: skip
    # an explicit offset overrides the alignment
    assert torch.equal(M.causal().dense(4, 4, q_offset=0)[0, 0], torch.ones(4, 4).tril().bool())


# -- 2. combinators -----------------------------------------------------------------------
@examples(60)
@given(st.data())
def test_combinators_act_elementwise_on_dense(data):
    mask, _, batch, q_offset, geo, _, _ = data.draw(problems(depth=0))
    b_mask, _ = data.draw(trees(1, KINDS, batch, geo))
    c_mask, _ = data.draw(trees(0, KINDS, batch, geo))
    a, b, c = (m.dense(geo.n_q, geo.n_k, q_offset) for m in (mask, b_mask, c_mask))
    dense = lambda m: m.dense(geo.n_q, geo.n_k, q_offset)  # noqa: E731
    assert torch.equal(dense(mask & b_mask), (a & b).expand_as(dense(mask & b_mask)))
    assert torch.equal(dense(mask | b_mask), (a | b).expand_as(dense(mask | b_mask)))
    assert torch.equal(dense(~mask), ~a)
    assert torch.equal(dense(~~mask), a)
    nested = (mask & ~b_mask) | c_mask
    assert torch.equal(dense(nested), ((a & ~b) | c).expand_as(dense(nested)))
    assert torch.equal(dense(~(mask & b_mask)), dense(~mask | ~b_mask))  # De Morgan
    assert torch.equal(dense(~(mask | b_mask)), dense(~mask & ~b_mask))


def test_mask_combines_with_a_boolean_tensor():
    t = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal((M.causal() & t).dense(6, 6)[0, 0], t.tril())


# -- 3. block summaries are sound; 4. exact for the leaves that promise it ----------------
@examples(300)
@given(problems(depth=3))
def test_block_summary_is_sound(problem):
    mask, _, _, q_offset, geo, block_q, block_k = problem
    dense = mask.dense(geo.n_q, geo.n_k, q_offset)
    s = mask.block_summary(geo.n_q, geo.n_k, block_q, block_k, q_offset)
    shape = (dense.shape[0], math.ceil(geo.n_q / block_q), math.ceil(geo.n_k / block_k))
    assert s.nonempty.shape == s.full.shape == shape
    assert s.nonempty.dtype == s.full.dtype == torch.bool
    any_, all_ = tiles(dense, block_q, block_k)
    assert not (any_ & ~s.nonempty).any(), "a tile marked empty has allowed entries"
    assert not (s.full & ~all_).any(), "a tile marked full has masked entries"
    assert not (s.full & ~s.nonempty).any(), "full but not nonempty"
    assert torch.equal(s.partial, s.nonempty & ~s.full)


@examples(300)
@given(problems(depth=0, kinds=EXACT))
def test_block_summary_of_leaves_is_exact(problem):
    mask, _, _, q_offset, geo, block_q, block_k = problem
    assert_exact_summary(mask, geo, q_offset, block_q, block_k)


@pytest.mark.parametrize("kind", EXACT)
def test_block_summary_of_leaves_is_exact_on_small_tiles(kind):
    """Tiles of one or a few entries, where e.g. a strided tile is full only at a multiple."""
    for seed, (n_q, n_k, q_offset) in enumerate(GEOMETRIES[:3] + GEOMETRIES[6:]):
        geo = Geometry.aligned(n_q, n_k, q_offset)
        mask, _ = seeded_leaf(kind, seed, 2, geo)
        for block_q, block_k in [(1, 1), (1, 3), (2, 1), (3, 5)]:
            assert_exact_summary(mask, geo, q_offset, block_q, block_k)


def assert_exact_summary(leaf, geo, q_offset, block_q, block_k):
    """Exact for the leaf, and so for its negation (whose views are the leaf's, swapped)."""
    for mask in (leaf, ~leaf):
        s = mask.block_summary(geo.n_q, geo.n_k, block_q, block_k, q_offset)
        any_, all_ = tiles(mask.dense(geo.n_q, geo.n_k, q_offset), block_q, block_k)
        assert torch.equal(s.nonempty, any_), f"{mask!r}: nonempty not exact"
        assert torch.equal(s.full, all_), f"{mask!r}: full not exact"


@examples(100)
@given(problems(depth=0, kinds=["document"]))
def test_document_summary_full_is_exact(problem):
    """Document ids are summarised by min/max per tile: `full` exact, `nonempty` sound only."""
    mask, _, _, q_offset, geo, block_q, block_k = problem
    s = mask.block_summary(geo.n_q, geo.n_k, block_q, block_k, q_offset)
    _, all_ = tiles(mask.dense(geo.n_q, geo.n_k, q_offset), block_q, block_k)
    assert torch.equal(s.full, all_)


# -- 5. the O(N·W) property, without a dense matrix ---------------------------------------
def test_sliding_window_summary_is_sparse():
    window = M.sliding_window(512).block_summary(4096, 4096, 128, 128)
    full_causal = M.causal().block_summary(4096, 4096, 128, 128)
    assert window.density < 0.2 and full_causal.density > 0.45
    # every query tile touches at most ceil(W / block) + 1 key tiles
    assert window.nonempty.sum(-1).max() <= 512 // 128 + 1


def test_block_summary_never_builds_the_dense_matrix():
    n, w, block = 1_000_000, 4096, 1024  # a dense n x n mask would be 10^12 booleans
    for mask in (M.sliding_window(w), (M.sliding_window(w) | M.sinks(4)) & M.causal()):
        s = mask.block_summary(n, n, block, block)
        assert s.nonempty.shape == (1, math.ceil(n / block), math.ceil(n / block))
        assert s.nonempty.sum(-1).max() <= w // block + 2  # window tiles plus the sink tile
        assert s.density < 0.01


# -- 6. per-batch masks -------------------------------------------------------------------
PER_BATCH = {
    "padding": lambda: M.padding([3, 0, 6], left=True),
    "document": lambda: M.document(torch.tensor([[0, 0, 1, 1, 1, 2]] * 2 + [[0] * 6])),
    "prefix_lm": lambda: M.prefix_lm(torch.tensor([0, 2, 5])),
    "block_sparse": lambda: M.block_sparse(torch.eye(3, dtype=torch.bool).repeat(3, 1, 1), 2),
}


@pytest.mark.parametrize("name", PER_BATCH)
def test_per_batch_masks_have_batch_size(name):
    mask = PER_BATCH[name]()
    assert mask.dense(6, 6).shape == (3, 1, 6, 6)
    s = mask.block_summary(6, 6, 4, 4)
    assert s.nonempty.shape == s.full.shape == (3, 2, 2)
    assert (mask & M.causal()).dense(6, 6).shape[0] == 3
    mask.check(3, Geometry.aligned(6, 6))
    with pytest.raises(ValueError, match="batch size 3"):
        mask.check(2, Geometry.aligned(6, 6))


def test_per_batch_rows_differ():
    d = M.padding([1, 3]).dense(2, 4)[:, 0, 0]
    assert d.tolist() == [[True, False, False, False], [True, True, True, False]]


def test_combining_different_batch_sizes_raises():
    two, three = M.padding([1, 2]), M.prefix_lm(torch.tensor([1, 2, 3]))
    for combine in (lambda: two & three, lambda: two | three, lambda: ~two & three):
        with pytest.raises(ValueError, match="different batch sizes"):
            combine()
    assert (M.padding([2]) & three).batch_size == 3  # one shared row broadcasts


@pytest.mark.parametrize(
    "mask, batch, geometry, match",
    [
        (M.padding([1, 2]), 3, (4, 4), "batch size"),
        (M.padding([5]), 1, (4, 4), "kv_lengths"),
        (M.causal() & M.padding([2, 9]), 2, (4, 8), "kv_lengths"),
        (M.document(torch.zeros(5, dtype=LONG)), 1, (4, 5), "q_ids"),
        (M.document(torch.zeros(4, dtype=LONG), torch.zeros(3, dtype=LONG)), 1, (4, 4), "kv_ids"),
        (M.block_sparse(torch.ones(2, 3, dtype=torch.bool), 4), 1, (12, 12), "layout"),
        (M.block_sparse(torch.ones(3, 2, dtype=torch.bool), 4), 1, (12, 12), "layout"),
        (M.block_sparse(torch.ones(3, 3, dtype=torch.bool), 4), 1, (4, 12, 9), "layout"),
        (M.from_tensor(torch.ones(3, 5, dtype=torch.bool)), 1, (4, 5), "does not broadcast"),
        (M.from_tensor(torch.ones(2, 1, 4, 4, dtype=torch.bool)), 3, (4, 4), "batch size"),
    ],
)
def test_check_rejects_mismatches(mask, batch, geometry, match):
    with pytest.raises(ValueError, match=match):
        mask.check(batch, Geometry.aligned(*geometry))


def test_check_accepts_at_the_limit():
    M.padding([4, 0]).check(2, Geometry.aligned(3, 4))
    M.block_sparse(torch.ones(3, 3, dtype=torch.bool), 4).check(1, Geometry.aligned(12, 12))
    M.block_sparse(torch.ones(3, 3, dtype=torch.bool), 4).check(1, Geometry.aligned(4, 12, 8))
    M.from_tensor(torch.ones(1, 5, dtype=torch.bool)).check(7, Geometry.aligned(4, 5))


def test_non_contiguous_tensors_work():
    g = torch.Generator().manual_seed(3)
    layout = torch.rand(5, 5, 2, generator=g) < 0.5
    ids, t = torch.randint(0, 3, (9, 2), generator=g), torch.rand(9, 9, generator=g) < 0.5
    lengths = torch.randint(0, 10, (6,), generator=g)
    for make, x in [
        (lambda x: M.block_sparse(x, 2), layout.permute(2, 0, 1)),
        (M.document, ids.T),
        (M.from_tensor, t.T),
        (M.padding, lengths[::2]),
        (M.prefix_lm, lengths[1::2]),
    ]:
        strided_mask, contiguous_mask = make(x), make(x.contiguous())
        assert not x.is_contiguous()
        assert torch.equal(strided_mask.dense(9, 9), contiguous_mask.dense(9, 9))
        s, c = strided_mask.block_summary(9, 9, 4, 3), contiguous_mask.block_summary(9, 9, 4, 3)
        assert torch.equal(s.nonempty, c.nonempty) and torch.equal(s.full, c.full)


# -- 7. bad input -------------------------------------------------------------------------
BAD = [
    ("window 0", lambda: M.sliding_window(0), ValueError, "size"),
    ("window -1", lambda: M.sliding_window(-1), ValueError, "size"),
    ("window float", lambda: M.sliding_window(2.0), TypeError, "size must be an integer"),
    ("window bool", lambda: M.sliding_window(True), TypeError, "size must be an integer"),
    ("padding empty", lambda: M.padding(torch.zeros(0, dtype=LONG)), ValueError, "kv_lengths"),
    ("prefix_lm empty", lambda: M.prefix_lm(torch.zeros(0, dtype=LONG)), ValueError, "prefix_len"),
    ("document empty", lambda: M.document(torch.zeros(0, 3, dtype=LONG)), ValueError, "q_ids"),
    (
        "layout empty",
        lambda: M.block_sparse(torch.ones(0, 2, 2, dtype=BOOL), 2),
        ValueError,
        "layout",
    ),
    ("chunked 0", lambda: M.chunked(0), ValueError, "size"),
    ("strided 0", lambda: M.strided(0), ValueError, "stride"),
    ("sinks -1", lambda: M.sinks(-1), ValueError, r"\bn must"),
    ("padding negative", lambda: M.padding([2, -1]), ValueError, "kv_lengths"),
    ("padding float", lambda: M.padding(torch.tensor([2.0, 1.0])), TypeError, "kv_lengths"),
    ("padding 2-D", lambda: M.padding(torch.ones(2, 2, dtype=LONG)), ValueError, "kv_lengths"),
    ("prefix_lm -1", lambda: M.prefix_lm(-1), ValueError, "prefix_len"),
    ("prefix_lm float", lambda: M.prefix_lm(1.5), TypeError, "prefix_len"),
    ("document float", lambda: M.document(torch.zeros(4)), TypeError, "q_ids"),
    ("layout long", lambda: M.block_sparse(torch.ones(2, 2, dtype=LONG), 4), TypeError, "layout"),
    ("layout 1-D", lambda: M.block_sparse(torch.ones(4, dtype=BOOL), 4), ValueError, "layout"),
    ("bs=0", lambda: M.block_sparse(torch.ones(2, 2, dtype=BOOL), 0), ValueError, "block_size"),
    ("tensor float", lambda: M.from_tensor(torch.zeros(4, 4)), TypeError, "boolean"),
    ("per head", lambda: M.from_tensor(torch.ones(1, 2, 4, 4, dtype=BOOL)), ValueError, "head"),
    ("tensor 1-D", lambda: M.from_tensor(torch.ones(4, dtype=BOOL)), ValueError, "dims"),
    ("mask & int", lambda: M.causal() & 3, TypeError, "masks combine"),
    ("mask | str", lambda: M.causal() | "causal", TypeError, "masks combine"),
    ("block_q 0", lambda: M.causal().block_summary(4, 4, 0, 2), ValueError, "block_q"),
    ("block_k -1", lambda: M.causal().block_summary(4, 4, 2, -1), ValueError, "block_k"),
]


@pytest.mark.parametrize("case, make, error, match", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise(case, make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_limits_pass_at_the_limit():
    eye, tril = torch.eye(9, dtype=torch.bool), torch.ones(9, 9).tril().bool()
    assert torch.equal(M.sliding_window(1).dense(9, 9)[0, 0], eye)
    assert torch.equal(M.chunked(1).dense(9, 9)[0, 0], eye)
    assert not M.sinks(0).dense(9, 9).any()
    assert not M.sinks(0).block_summary(9, 9, 4, 4).nonempty.any()
    assert torch.equal(M.strided(1).dense(9, 9)[0, 0], tril)
    assert torch.equal(M.prefix_lm(0).dense(9, 9)[0, 0], tril)
    assert torch.equal(M.sliding_window(9).dense(9, 9)[0, 0], tril)
    assert not M.padding([0]).dense(3, 9).any() and M.padding([9]).dense(3, 9).all()


# -- 8. masks are values ------------------------------------------------------------------
def test_masks_with_tensors_and_combinations_are_values():
    ids = torch.tensor([0, 0, 1, 1])
    assert M.prefix_lm(3) == M.prefix_lm(3) and M.prefix_lm(3) != M.prefix_lm(4)
    assert M.padding([3, 4]) == M.padding(torch.tensor([3, 4]))
    assert M.padding([3, 4]) != M.padding([3, 4], left=True)
    assert M.document(ids) == M.document(ids.clone()) and M.document(ids) != M.document(1 - ids)
    combined = M.causal() & M.sinks(4)
    assert combined == M.causal() & M.sinks(4) and combined != M.causal() | M.sinks(4)
    assert hash(combined) == hash(M.causal() & M.sinks(4))
    assert len({M.padding([3]), M.padding([3]), M.padding([2])}) == 2


def test_integer_like_parameters_are_accepted():
    np = pytest.importorskip("numpy")
    assert M.sliding_window(np.int64(3)) == M.sliding_window(3)


def test_a_tensor_combines_with_a_mask_on_either_side():
    t = torch.rand(5, 5) > 0.5
    want = t & M.causal().dense(5, 5)[0, 0]
    assert torch.equal((t & M.causal()).dense(5, 5)[0, 0], want)
    assert torch.equal((M.causal() & t).dense(5, 5)[0, 0], want)
    assert torch.equal((t | M.causal()).dense(5, 5)[0, 0], t | M.causal().dense(5, 5)[0, 0])


def test_views_check_that_the_mask_fits():
    with pytest.raises(ValueError, match="q_ids has length 6, but the inputs have 4"):
        M.document(torch.arange(6)).dense(4, 4)
    with pytest.raises(ValueError, match="does not cover"):
        M.block_sparse(torch.ones(1, 1, dtype=BOOL), 2).block_summary(4, 4, 2, 2)


@pytest.mark.parametrize("n_q, n_k", [(5, 0), (0, 5), (0, 0)])
def test_summaries_of_zero_length_problems_are_empty(n_q, n_k):
    for mask in (
        M.causal(),
        M.document(torch.arange(n_q), torch.arange(n_k)),
        M.from_tensor(torch.ones(n_q, n_k, dtype=BOOL)),
    ):
        summary = mask.block_summary(n_q, n_k, 4, 4)
        assert summary.nonempty.shape == (1, -(-n_q // 4), -(-n_k // 4))
        assert not summary.nonempty.any()


def test_positional_masks_are_values():
    assert M.causal() == M.causal() and hash(M.causal()) == hash(M.causal())
    assert M.sliding_window(3) == M.sliding_window(3)
    assert hash(M.sliding_window(3)) == hash(M.sliding_window(3))
    assert M.sliding_window(3) != M.sliding_window(4)
    assert M.sliding_window(3) != M.chunked(3) and M.strided(2) != M.sinks(2)
    assert len({M.causal(), M.causal(), M.sinks(4), M.sinks(4), M.sinks(5)}) == 3


@pytest.mark.parametrize(
    "mask, parts",
    [
        (M.sliding_window(3), ["sliding_window", "3"]),
        (M.chunked(5), ["chunked", "5"]),
        (M.strided(2), ["strided", "2"]),
        (M.sinks(4), ["sinks", "4"]),
        (M.prefix_lm(7), ["prefix_lm", "7"]),
        (M.padding([3, 5], left=True), ["padding", "[3, 5]", "left=True"]),
        (M.block_sparse(torch.ones(2, 3, dtype=torch.bool), 16), ["block_sparse", "16"]),
        (M.causal() & M.sinks(4), ["causal()", "&", "sinks(4)"]),
        (~(M.causal() | M.chunked(8)), ["~", "causal()", "|", "chunked(8)"]),
    ],
)
def test_repr_names_the_parameters(mask, parts):
    assert all(part in repr(mask) for part in parts), repr(mask)


# -- 9. dense dtype, shape, device --------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dense_is_bool_on_cpu(kind):
    geo = Geometry.aligned(7, 11)
    mask, _ = seeded_leaf(kind, 7, 2, geo)
    d = mask.dense(7, 11, device="cpu")
    assert d.dtype == torch.bool and d.device.type == "cpu"
    assert d.shape == (mask.batch_size or 1, 1, 7, 11)
    assert mask.batch_size in (None, 2)


def test_padding_lengths_reads_right_padding_only():
    lengths = torch.tensor([3, 1])
    assert torch.equal(M.padding_lengths(M.padding(lengths)), lengths)
    assert M.padding_lengths(M.padding(lengths, left=True)) is None
    assert M.padding_lengths(M.causal()) is None and M.padding_lengths(None) is None


def test_the_kept_block_summary_answers_only_the_same_question():
    mask = M.sliding_window(5)
    first = mask.block_summary(20, 20, 4, 4)
    assert mask.block_summary(20, 20, 4, 4) is first  # asked again: kept
    other = mask.block_summary(20, 24, 4, 8)  # another question: computed afresh
    fresh = M.sliding_window(5).block_summary(20, 24, 4, 8)
    assert torch.equal(other.nonempty, fresh.nonempty) and torch.equal(other.full, fresh.full)
    assert mask == M.sliding_window(5)  # the kept answer is not part of the mask's value
