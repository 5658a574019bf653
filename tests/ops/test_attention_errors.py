"""Bad input to `attention()` raises an error naming the argument, value and what is allowed."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit import masks
from attnkit.ops.backends import TiledBackend


def qkv(b=2, h=4, hk=2, nq=5, nk=6, d=8, dv=None, dtype=torch.float32):
    return (
        torch.randn(b, h, nq, d, dtype=dtype),
        torch.randn(b, hk, nk, d, dtype=dtype),
        torch.randn(b, hk, nk, dv or d, dtype=dtype),
    )


def test_wrong_rank_names_the_tensor_and_shape():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k must have 4 dims .* got shape \(2, 6, 8\)"):
        attnkit.attention(q, k[:, 0], v)


def test_non_tensor_input():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="v must be a torch.Tensor, got list"):
        attnkit.attention(q, k, v.tolist())


def test_heads_that_do_not_divide():
    q, k, v = qkv(h=9, hk=2)
    with pytest.raises(ValueError, match="q has 9 heads.*not a multiple of the 2 KV heads"):
        attnkit.attention(q, k, v)


def test_k_and_v_head_counts_differ():
    q, k, _ = qkv(hk=2)
    v = torch.randn(2, 1, 6, 8)
    with pytest.raises(ValueError, match="k has 2 heads but v has 1"):
        attnkit.attention(q, k, v)


def test_mismatched_batch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch sizes differ: q 2, k 1, v 2"):
        attnkit.attention(q, k[:1], v)


def test_mismatched_head_dim():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q head_dim 8 differs from k head_dim 7"):
        attnkit.attention(q, k[..., :7], v)


def test_k_and_v_lengths_differ():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k has 6 keys but v has 5"):
        attnkit.attention(q, k, v[:, :, :5])


def test_mismatched_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"share a dtype, got torch.float32, torch.float64"):
        attnkit.attention(q, k.double(), v)


def test_unsupported_dtype_lists_the_allowed_ones():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q has dtype torch.int64; allowed: .*float16"):
        attnkit.attention(q.long(), k.long(), v.long())


def test_mismatched_device():
    q, k, v = qkv()
    meta = torch.empty(k.shape, device="meta")
    with pytest.raises(ValueError, match="must be on one device, got cpu, meta, cpu"):
        attnkit.attention(q, meta, v)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=f"scale must be a positive finite number, got {scale}"):
        attnkit.attention(*qkv(), scale=scale)


@pytest.mark.parametrize("softcap", [0.0, -5.0, float("inf")])
def test_bad_softcap(softcap):
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        attnkit.attention(*qkv(), softcap=softcap, backend="tiled")


def test_softcap_at_its_limit_works():
    out = attnkit.attention(*qkv(), softcap=1e-6, backend="tiled")  # tiny but positive
    assert torch.isfinite(out).all()


def test_mask_that_does_not_broadcast():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"does not broadcast to \(batch=2, 1, n_q=5, n_k=6\)"):
        attnkit.attention(q, k, v, torch.ones(5, 7, dtype=torch.bool))


def test_mask_for_another_batch_size():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="is for batch size 3, but the inputs have batch size 2"):
        attnkit.attention(q, k, v, masks.padding([1, 2, 3]))


def test_float_mask_is_rejected_with_advice():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="boolean tensor.*additive float masks are not supported"):
        attnkit.attention(q, k, v, torch.zeros(5, 6))


def test_mask_of_the_wrong_type():
    with pytest.raises(TypeError, match="mask must be None, an attnkit mask or a boolean tensor"):
        attnkit.attention(*qkv(), mask="causal")


def test_unknown_backend_lists_the_choices():
    with pytest.raises(ValueError, match=r"backend must be one of auto, .*, triton; got 'fast'"):
        attnkit.attention(*qkv(), backend="fast")


def test_backend_of_the_wrong_type():
    with pytest.raises(TypeError, match="backend must be a name or a Backend, got int"):
        attnkit.attention(*qkv(), backend=3)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [({"return_lse": True}, "does not return the log-sum-exp"), ({"softcap": 5.0}, "no softcap")],
)
def test_named_backend_that_cannot_serve_the_request(kwargs, reason):
    with pytest.raises(ValueError, match=f"backend 'sdpa' cannot serve this request: .*{reason}"):
        attnkit.attention(*qkv(), backend="sdpa", **kwargs)


def test_q_offset_must_be_an_int():
    with pytest.raises(TypeError, match="q_offset must be an int or None, got float"):
        attnkit.attention(*qkv(), mask=masks.causal(), q_offset=1.5)


@pytest.mark.parametrize("blocks", [(0, 4), (4, 0), (2.5, 4)])
def test_tiled_block_sizes_must_be_positive_ints(blocks):
    with pytest.raises(ValueError, match="block_q|block_k"):
        TiledBackend(*blocks)


def test_tiled_block_size_one_is_the_limit_and_works():
    q, k, v = qkv(dtype=torch.float64)
    got = attnkit.attention(q, k, v, masks.causal(), backend=TiledBackend(1, 1))
    want = attnkit.attention(q, k, v, masks.causal(), backend="reference")
    assert (got - want).abs().max() < 1e-12


def test_q_with_no_heads():
    q, k, v = qkv()
    with pytest.raises(
        ValueError, match=r"q must have at least one head, got shape \(2, 0, 5, 8\)"
    ):
        attnkit.attention(q[:, :0], k, v)


def test_integer_like_q_offset_is_accepted():
    np = pytest.importorskip("numpy")
    q, k, v = qkv()
    want = attnkit.attention(q, k, v, masks.causal(), q_offset=1)
    assert torch.equal(attnkit.attention(q, k, v, masks.causal(), q_offset=np.int64(1)), want)


def test_merge_attention_names_the_part_with_the_wrong_shape():
    out, lse = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"part 1: out has shape \(1, 2, 3, 5\)"):
        attnkit.merge_attention([(out, lse), (torch.zeros(1, 2, 3, 5), lse)])
    with pytest.raises(ValueError, match=r"part 1: lse has shape \(1, 2, 4\), expected"):
        attnkit.merge_attention([(out, lse), (out, torch.zeros(1, 2, 4))])


def test_registering_a_taken_backend_name_needs_replace():
    from attnkit.ops.backends import ReferenceBackend, register

    with pytest.raises(ValueError, match="'reference' is already registered; pass replace=True"):
        register(ReferenceBackend())
