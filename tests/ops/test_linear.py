"""Linear attention: the three forms equal a float64 reference; split states are exact."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attn_testing import NOISE_FLOOR, max_err, random_qkv
from attnkit.ops import linear as linear_module
from attnkit.ops.linear import (
    FEATURE_MAPS,
    apply_feature_map,
    feature_dim,
    linear_attention,
)

MAPS = list(FEATURE_MAPS)
EPS = 1e-6


def kernel(q, k, feature_map):
    """φ(q)·φ(k) for every (query, key) pair, written out from each map's definition."""
    if feature_map == "elu":
        return (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    if feature_map == "relu":
        return q.relu() @ k.relu().transpose(-1, -2)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return 1 + s + s**2 / 2  # taylor: second-order expansion of exp(s)


def reference(q, k, v, feature_map, causal):
    """The explicit kernel matrix, masked, row-normalised, with K/V repeated per query head."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = kernel(q, k, feature_map)
    if causal:
        scores = scores.tril()
    return (scores @ v) / (scores.sum(-1, keepdim=True) + EPS)


def draw(seed, n_q=7, n_k=None, head_dim=16, v_head_dim=None, dtype=torch.float64, **kw):
    gen = torch.Generator().manual_seed(seed)
    n_k = n_q if n_k is None else n_k
    return random_qkv(
        gen, n_q=n_q, n_k=n_k, head_dim=head_dim, v_head_dim=v_head_dim, dtype=dtype, **kw
    )


def close(a, b, tol=1e-10):
    """Max abs error within `tol` relative to the reference's magnitude (floats64)."""
    err = max_err(a, b)
    assert err <= tol * max(1.0, b.abs().max().item()), f"error {err:.3g}"


@pytest.mark.parametrize("d", [1, 8, 59])
@pytest.mark.parametrize("feature_map", MAPS)
def test_feature_maps_produce_their_kernel_and_feature_dim(feature_map, d):
    gen = torch.Generator().manual_seed(d)
    x, y = torch.randn(2, 5, d, generator=gen, dtype=torch.float64).unbind(0)
    fx, fy = apply_feature_map(x, feature_map), apply_feature_map(y, feature_map)
    assert fx.shape == (5, feature_dim(feature_map, d))
    close(fx @ fy.T, kernel(x, y, feature_map), 1e-13)
    if feature_map != "relu":
        assert (fx @ fy.T).min() > 0  # the normaliser cannot vanish


# (n, chunk_size): one token; chunk larger than, equal to, not dividing the sequence.
SIZES = [(1, 4), (7, 64), (7, 7), (7, 3), (97, 16)]


@pytest.mark.parametrize("n,chunk", SIZES, ids=str)
@pytest.mark.parametrize("feature_map", MAPS)
def test_causal_forms_equal_the_float64_reference(feature_map, n, chunk):
    """9 query heads over 3 KV heads, head dim 59, v head dim 13."""
    q, k, v = draw(n, n, head_dim=59, v_head_dim=13)
    want = reference(q, k, v, feature_map, causal=True)
    for form in ("parallel", "chunkwise", "recurrent"):
        got = linear_attention(q, k, v, feature_map=feature_map, form=form, chunk_size=chunk)
        assert got.shape == want.shape and got.dtype == torch.float64
        close(got, want)


@pytest.mark.parametrize("feature_map", MAPS)
def test_chunkwise_in_groups_of_chunks_with_a_carried_state_is_exact(feature_map, monkeypatch):
    # A prefix-state budget of about one and three chunks a group, so the state passes from
    # group to group, after a state carried in from the first 40 tokens (recurrent form).
    q, k, v = draw(97, 97, head_dim=59, v_head_dim=13)
    want = reference(q, k, v, feature_map, causal=True)
    head, tail = slice(0, 40), slice(40, None)
    opts = dict(feature_map=feature_map, return_state=True)
    _, whole = linear_attention(q, k, v, form="recurrent", **opts)
    out_head, state = linear_attention(
        q[:, :, head], k[:, :, head], v[:, :, head], form="recurrent", **opts
    )
    close(out_head, want[:, :, head])
    batch, kv_heads = k.shape[:2]
    per_chunk = batch * kv_heads * feature_dim(feature_map, 59) * (13 + 1)  # states of [v | 1]
    for chunks_a_group in (1, 3):
        monkeypatch.setattr(linear_module, "PREFIX_STATE_ELEMENTS", chunks_a_group * per_chunk)
        out_tail, final = linear_attention(
            q[:, :, tail], k[:, :, tail], v[:, :, tail], chunk_size=16, state=state, **opts
        )
        close(out_tail, want[:, :, tail])
        close(final.S, whole.S, 1e-12)
        close(final.z, whole.z, 1e-12)


@pytest.mark.parametrize("feature_map", MAPS)
def test_chunkwise_gradients_equal_the_parallel_forms(feature_map):
    # training runs the chunkwise form: its in-place steps must leave autograd exact
    q, k, v = (t.requires_grad_() for t in draw(5, 37, head_dim=11, v_head_dim=6))
    grads = {}
    for form in ("chunkwise", "parallel"):
        out = linear_attention(q, k, v, feature_map=feature_map, form=form, chunk_size=8)
        grads[form] = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads["chunkwise"], grads["parallel"], strict=True):
        close(got, want, 1e-12)


@pytest.mark.parametrize("initial", ["zeros", "random"])
def test_chunkwise_gradients_reach_a_given_initial_state(initial):
    # a learnt initial state often starts at zero: it must still be in the graph
    q, k, v = draw(6, 37, head_dim=11, v_head_dim=6)
    gen = torch.Generator().manual_seed(7)
    S0 = torch.randn(2, 3, 11, 6, generator=gen, dtype=torch.float64)  # (b, kv_heads, feat, dv)
    z0 = torch.rand(2, 3, 11, generator=gen, dtype=torch.float64)
    if initial == "zeros":
        S0, z0 = S0.zero_(), z0.zero_()
    grads = {}
    for form in ("chunkwise", "parallel"):
        S, z = S0.clone().requires_grad_(), z0.clone().requires_grad_()
        out, final = linear_attention(
            q, k, v, form=form, chunk_size=8, state=(S, z), return_state=True
        )
        loss = out.square().sum() + final.S.square().sum() + final.z.square().sum()
        grads[form] = torch.autograd.grad(loss, (S, z))
    for got, want in zip(grads["chunkwise"], grads["parallel"], strict=True):
        close(got, want, 1e-12)


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (7, 97), (97, 7)], ids=str)
@pytest.mark.parametrize("feature_map", MAPS)
def test_non_causal_forms_equal_the_float64_reference(feature_map, n_q, n_k):
    q, k, v = draw(n_q, n_q, n_k, head_dim=59, v_head_dim=13)
    want = reference(q, k, v, feature_map, causal=False)
    for form in ("parallel", "chunkwise"):
        got = linear_attention(q, k, v, feature_map=feature_map, causal=False, form=form)
        close(got, want)


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_equals_mha_with_repeated_kv(causal):
    q, k, v = draw(3, 11)
    mha = linear_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=causal, chunk_size=4
    )
    close(linear_attention(q, k, v, causal=causal, chunk_size=4), mha, 1e-13)


@pytest.mark.parametrize("first,second", [("chunkwise", "recurrent"), ("recurrent", "parallel")])
@pytest.mark.parametrize("feature_map", MAPS)
def test_a_state_carried_across_a_split_at_every_position_is_exact(feature_map, first, second):
    n = 13
    q, k, v = draw(5, n, v_head_dim=5)
    whole, whole_state = linear_attention(
        q, k, v, feature_map=feature_map, chunk_size=4, return_state=True
    )
    for split in range(n + 1):
        a, b = slice(0, split), slice(split, n)
        opts = dict(feature_map=feature_map, chunk_size=4, return_state=True)
        out_a, state = linear_attention(q[:, :, a], k[:, :, a], v[:, :, a], form=first, **opts)
        out_b, state = linear_attention(
            q[:, :, b], k[:, :, b], v[:, :, b], form=second, state=state, **opts
        )
        close(torch.cat([out_a, out_b], dim=2), whole, 1e-12)
        close(state.S, whole_state.S, 1e-12)
        close(state.z, whole_state.z, 1e-12)


@pytest.mark.parametrize("feature_map", MAPS)
def test_the_state_is_the_sum_over_keys_and_a_non_causal_state_means_earlier_keys(feature_map):
    q, k, v = draw(6, 9, v_head_dim=4)
    _, (S, z) = linear_attention(q, k, v, feature_map=feature_map, return_state=True)
    fk = apply_feature_map(k, feature_map)
    close(S, fk.transpose(-1, -2) @ v, 1e-12)
    close(z, fk.sum(2), 1e-12)
    # Non-causal queries over (state of keys 0..3) + keys 4..8 see all nine keys.
    _, state = linear_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], return_state=True)
    for form in ("parallel", "chunkwise"):
        got = linear_attention(q, k[:, :, 4:], v[:, :, 4:], causal=False, form=form, state=state)
        close(got, reference(q, k, v, "elu", causal=False), 1e-12)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_changing_later_tokens_leaves_earlier_outputs_unchanged(form):
    q, k, v = draw(7, 20)
    before = linear_attention(q, k, v, form=form, chunk_size=8)
    for t in (1, 7, 8, 19):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t:] = 10 * torch.randn_like(x[:, :, t:])
        after = linear_attention(q2, k2, v2, form=form, chunk_size=8)
        assert max_err(after[:, :, :t], before[:, :, :t]) <= 1e-14
        assert max_err(after[:, :, t:], before[:, :, t:]) > 1e-3  # the change is seen


def prefix_sums(q, k, v, feature_map):
    """The textbook O(N) causal form in plain PyTorch: states S_t, z_t as cumulative sums."""
    b, heads, n, _ = q.shape
    fq = apply_feature_map(q, feature_map).view(b, k.shape[1], heads // k.shape[1], n, -1)
    fk = apply_feature_map(k, feature_map)
    S = torch.cumsum(fk.unsqueeze(-1) * v.unsqueeze(-2), dim=2)  # (b, kv_heads, n, feat, dv)
    z = torch.cumsum(fk, dim=2)
    num = torch.einsum("bhgnf,bhnfe->bhgne", fq, S)
    den = torch.einsum("bhgnf,bhnf->bhgn", fq, z).unsqueeze(-1)
    return (num / (den + EPS)).reshape(b, heads, n, -1)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_float32_error_is_at_most_twice_the_plain_prefix_sum_forms(feature_map, form):
    # Taylor features grow as d²/2, and prefix_sums keeps a state per token: a smaller d.
    head_dim = 23 if feature_map == "taylor" else 59
    q, k, v = draw(8, 97, head_dim=head_dim, dtype=torch.float32)
    want = reference(q.double(), k.double(), v.double(), feature_map, causal=True)
    plain = prefix_sums(q, k, v, feature_map)
    got = linear_attention(q, k, v, feature_map=feature_map, form=form, chunk_size=16)
    assert got.dtype == torch.float32 and not got.isnan().any()
    assert max_err(got, want) <= 2 * max_err(plain, want) + NOISE_FLOOR[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    """Error vs float64 at most 2x the reference formula evaluated in the half dtype itself."""
    q, k, v = draw(9, 97, dtype=dtype)
    want = reference(q.double(), k.double(), v.double(), "elu", causal=True)
    plain = reference(q, k, v, "elu", causal=True)
    got, state = linear_attention(q, k, v, return_state=True, chunk_size=16)
    assert got.dtype == dtype and state.S.dtype == state.z.dtype == torch.float32
    assert not got.isnan().any()
    assert max_err(got, want) <= 2 * max_err(plain, want) + NOISE_FLOOR[dtype]


def test_relu_rows_with_no_active_feature_give_zeros_not_nan():
    q, k, v = draw(10, 5)
    q = -q.abs()  # relu(q) = 0: every normaliser is 0 + eps
    for form in ("parallel", "chunkwise", "recurrent"):
        out = linear_attention(q, k, v, feature_map="relu", form=form)
        assert torch.equal(out, torch.zeros_like(out))


def test_zero_length_sequences_return_empty_outputs_and_keep_the_state():
    q, k, v = draw(11, 4)
    _, state = linear_attention(q, k, v, return_state=True)
    empty = (q[:, :, :0], k[:, :, :0], v[:, :, :0])
    for form in ("parallel", "chunkwise", "recurrent"):
        out, after = linear_attention(*empty, form=form, state=state, return_state=True)
        assert out.shape == (2, 9, 0, 16)
        assert torch.equal(after.S, state.S) and torch.equal(after.z, state.z)


def test_non_contiguous_inputs_work():
    q, k, v = draw(12, 9)
    want = linear_attention(q, k, v, chunk_size=4)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    assert not strided[0].is_contiguous()
    close(linear_attention(*strided, chunk_size=4), want, 1e-13)


# -- bad input ---------------------------------------------------------------------------


def test_unknown_feature_map_lists_the_allowed_ones():
    q, k, v = draw(0)
    with pytest.raises(ValueError, match="feature_map must be one of 'elu', 'relu', 'taylor'"):
        linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="feature_map must be one of .* got 'exp'"):
        feature_dim("exp", 8)


def test_unknown_form_and_non_causal_recurrent_are_refused():
    q, k, v = draw(0)
    with pytest.raises(ValueError, match="form must be one of 'parallel', 'chunkwise'"):
        linear_attention(q, k, v, form="scan")
    with pytest.raises(ValueError, match="form='recurrent' is causal by construction"):
        linear_attention(q, k, v, form="recurrent", causal=False)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_chunk_size_must_be_a_positive_integer(chunk_size):
    q, k, v = draw(0)
    with pytest.raises(ValueError, match=f"chunk_size must be an integer >= 1, got {chunk_size}"):
        linear_attention(q, k, v, chunk_size=chunk_size)


@pytest.mark.parametrize("eps", [-1e-6, float("inf"), float("nan")])
def test_eps_must_be_finite_and_non_negative(eps):
    q, k, v = draw(0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        linear_attention(q, k, v, eps=eps)


def test_mismatched_shapes_name_the_problem():
    q, k, v = draw(0)
    cases = [
        ((q[0], k, v), ValueError, "q must have 4 dims"),
        ((q, k[:1], v), ValueError, "batch sizes differ: q 2, k 1, v 2"),
        ((q, k, v[:, :, :5]), ValueError, r"k \(heads, keys\) = \(3, 7\) and v = \(3, 5\)"),
        ((q[:, :7], k, v), ValueError, "q has 7 heads, which is not a multiple of the 3 KV"),
        ((q[..., :15], k, v), ValueError, "q head_dim 15 differs from k head_dim 16"),
        ((q, k, v.float()), TypeError, "q, k, v must share a dtype"),
        ((q, k.long(), v), TypeError, "k must be a floating-point tensor"),
        ((q, k.tolist(), v), TypeError, "k must be a torch.Tensor, got list"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            linear_attention(*args)
    with pytest.raises(ValueError, match="causal linear attention needs as many queries as keys"):
        linear_attention(q[:, :, :3], k, v)


def test_a_state_of_the_wrong_shape_is_refused():
    q, k, v = draw(0, v_head_dim=5)
    _, (S, z) = linear_attention(q, k, v, return_state=True)
    with pytest.raises(ValueError, match=r"state S must be \(batch, kv_heads, feat, dv\) = "):
        linear_attention(q, k, v, state=(S[..., :4], z))
    with pytest.raises(ValueError, match=r"state z must be \(batch, kv_heads, feat\) = "):
        linear_attention(q, k, v, state=(S, z[:1]))
    with pytest.raises(TypeError, match="state must be a pair"):
        linear_attention(q, k, v, state=S)
