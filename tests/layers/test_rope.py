"""RotaryEmbedding and RopeScaling against Hugging Face transformers and RoPE's invariants."""

import dataclasses
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from attnkit.layers.rope import (
    DynamicNTKScaling,
    LinearScaling,
    Llama3Scaling,
    NTKScaling,
    RopeScaling,
    RotaryEmbedding,
    YarnScaling,
    apply_rotary,
    rotation_phasors,
)

# name: (HF rope_parameters without rope_theta, attnkit scaling, theta, max_position_embeddings)
HF_CASES = {
    "none": ({"rope_type": "default"}, RopeScaling(), 1e4, 4096),
    "linear": ({"rope_type": "linear", "factor": 4.0}, LinearScaling(factor=4.0), 1e4, 4096),
    "dynamic": (
        {"rope_type": "dynamic", "factor": 2.0},
        DynamicNTKScaling(factor=2.0, original_max_position_embeddings=4096),
        1e5,
        4096,
    ),
    "yarn": (
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        YarnScaling(factor=4.0, original_max_position_embeddings=1024),
        1e4,
        4096,
    ),
    "yarn_custom": (  # DeepSeek-style mscale pair, custom betas, no truncation
        {
            "rope_type": "yarn",
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
            "truncate": False,
        },
        YarnScaling(
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=16.0,
            beta_slow=2.0,
            mscale=1.0,
            mscale_all_dim=0.8,
            truncate=False,
        ),
        1e4,
        163840,
    ),
    "yarn_attention_factor": (
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 2048,
            "attention_factor": 1.25,
        },
        YarnScaling(factor=8.0, original_max_position_embeddings=2048, attention_factor=1.25),
        5e5,
        16384,
    ),
    "llama3": (  # Llama 3.1's values
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        Llama3Scaling(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        5e5,
        131072,
    ),
}
# (head_dim, rotary_dim): full rotary at 64, 128 and a non-power-of-two 96; partial halves/quarters
DIMS = [(64, 64), (128, 128), (96, 96), (128, 64), (96, 24)]
STATIC_SCALINGS = {
    "none": RopeScaling(),
    "linear": LinearScaling(factor=4.0),
    "ntk": NTKScaling(factor=4.0),
    "yarn": YarnScaling(factor=4.0, original_max_position_embeddings=1024),
    "llama3": HF_CASES["llama3"][1],
}


def hf_config(head_dim: int, rotary_dim: int, case: str) -> LlamaConfig:
    """A LlamaConfig whose rope_parameters describe ``case`` (partial rotary as a fraction)."""
    params, _, theta, max_pos = HF_CASES[case]
    params = {**params, "rope_theta": theta}
    if rotary_dim != head_dim:
        params["partial_rotary_factor"] = rotary_dim / head_dim
        assert int(head_dim * params["partial_rotary_factor"]) == rotary_dim
    return LlamaConfig(
        head_dim=head_dim,
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        rope_parameters=params,
    )


def hf_inv_freq(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """HF's (inv_freq, attention_scaling); GPT-NeoX's default honours partial_rotary_factor."""
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)


def rope_for(case: str, head_dim: int, rotary_dim: int, **kwargs) -> RotaryEmbedding:
    """attnkit's RotaryEmbedding for a HF case, its scaling built by ``from_hf``."""
    params, _, theta, max_pos = HF_CASES[case]
    scaling = RopeScaling.from_hf(params, max_position_embeddings=max_pos)
    return RotaryEmbedding(head_dim, theta, rotary_dim=rotary_dim, scaling=scaling, **kwargs)


def qk(gen, batch=2, heads=9, kv_heads=3, seq=33, head_dim=64, dtype=torch.float64):
    """Random GQA queries and keys (9 query heads over 3 KV heads)."""
    q = torch.randn(batch, heads, seq, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype)


def interleave_perm(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Index map half-split -> interleaved: slot 2i holds dim i, slot 2i+1 holds dim i + r/2."""
    half = torch.arange(rotary_dim // 2)
    pairs = torch.stack((half, half + rotary_dim // 2), dim=-1).flatten()
    return torch.cat((pairs, torch.arange(rotary_dim, head_dim)))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --- Hugging Face parity ---------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_from_hf_builds_the_expected_scaling(case):
    params, expected, _, max_pos = HF_CASES[case]
    assert RopeScaling.from_hf(params, max_position_embeddings=max_pos) == expected
    legacy = {("type" if k == "rope_type" else k): v for k, v in params.items()}  # old key
    assert RopeScaling.from_hf(legacy, max_position_embeddings=max_pos) == expected


@pytest.mark.parametrize(("head_dim", "rotary_dim"), DIMS)
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_inv_freq_and_attention_scaling_equal_hf(case, head_dim, rotary_dim):
    rope = rope_for(case, head_dim, rotary_dim)
    inv_freq, attention_scaling = hf_inv_freq(hf_config(head_dim, rotary_dim, case))
    torch.testing.assert_close(rope.inv_freq, inv_freq, rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(attention_scaling, rel=1e-12)


@pytest.mark.parametrize(("head_dim", "rotary_dim"), DIMS)
@pytest.mark.parametrize("above", [False, True])
def test_dynamic_inv_freq_equals_hf_at_seq_len(head_dim, rotary_dim, above):
    rope = rope_for("dynamic", head_dim, rotary_dim)
    original = rope.scaling.original_max_position_embeddings
    config = hf_config(head_dim, rotary_dim, "dynamic")
    for seq_len in [original + 1, 3 * original + 7] if above else [1, original // 2, original]:
        expected, _ = hf_inv_freq(config, seq_len=seq_len)
        torch.testing.assert_close(rope.inv_freq_at(seq_len), expected, rtol=1e-6, atol=0)
        positions = torch.tensor([0, seq_len - 1])  # the largest position sets the length
        cos, _ = rope.cos_sin(positions, torch.float64)
        exact = torch.cos((seq_len - 1) * rope.inv_freq_at(seq_len).double())
        torch.testing.assert_close(cos[1], exact, rtol=0, atol=1e-12)
    if above:  # the frequencies really changed
        assert not torch.equal(rope.inv_freq_at(original + 1), rope.inv_freq)


def test_dynamic_keeps_no_state(gen):
    rope = rope_for("dynamic", 64, 64)
    short = torch.randint(0, 4096, (2, 17), generator=gen)
    fresh = rope.cos_sin(short)
    rope.cos_sin(torch.tensor([50_000]))  # HF's module would keep these grown frequencies
    for a, b in zip(rope.cos_sin(short), fresh, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("head_dim", "rotary_dim"), DIMS)
def test_ntk_matches_the_theta_formula(head_dim, rotary_dim):
    factor, theta = 4.0, 1e4
    rope = RotaryEmbedding(head_dim, theta, rotary_dim=rotary_dim, scaling=NTKScaling(factor=4.0))
    d = rotary_dim
    scaled_theta = theta * factor ** (d / (d - 2))
    exact = 1.0 / scaled_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(rope.inv_freq.double(), exact, rtol=1e-6, atol=0)
    assert rope.inv_freq[-1] < RotaryEmbedding(head_dim, theta, rotary_dim=d).inv_freq[-1]
    assert rope.attention_scaling == 1.0


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(128, 128), (96, 96), (96, 24)])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_cos_sin_and_rotation_equal_hf_module_float32(case, head_dim, rotary_dim, gen):
    config = hf_config(head_dim, rotary_dim, case)
    hf_rope = GPTNeoXRotaryEmbedding(config)  # Llama's module, plus partial rotary support
    rope = rope_for(case, head_dim, rotary_dim)
    positions = torch.randint(0, 20_000, (2, 33), generator=gen)  # per batch, not contiguous
    hf_cos, hf_sin = hf_rope(torch.zeros(1), positions)
    cos, sin = rope.cos_sin(positions)
    # Same float32 frequencies and angle products: equal up to float32 rounding of cos/sin.
    torch.testing.assert_close(torch.cat((cos, cos), -1), hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat((sin, sin), -1), hf_sin, rtol=0, atol=1e-6)
    q, k = qk(gen, head_dim=head_dim, dtype=torch.float32)
    r = rotary_dim
    q_hf, k_hf = apply_rotary_pos_emb(q[..., :r], k[..., :r], hf_cos, hf_sin)
    q_rot, k_rot = rope(q, k, positions)
    torch.testing.assert_close(q_rot, torch.cat((q_hf, q[..., r:]), -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(k_rot, torch.cat((k_hf, k[..., r:]), -1), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (128, 128), (96, 24)])
@pytest.mark.parametrize("case", ["none", "yarn", "llama3"])
def test_rotation_equals_hf_apply_rotary_pos_emb_float64(case, head_dim, rotary_dim, gen):
    rope = rope_for(case, head_dim, rotary_dim)
    positions = torch.randint(0, 100_000, (2, 33), generator=gen)
    q, k = qk(gen, head_dim=head_dim)
    cos, sin = rope.cos_sin(positions, torch.float64)
    assert cos.dtype == torch.float64 and cos.shape == (2, 33, rotary_dim // 2)
    r = rotary_dim
    cos_hf, sin_hf = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    q_hf, k_hf = apply_rotary_pos_emb(q[..., :r], k[..., :r], cos_hf, sin_hf)
    q_rot, k_rot = rope(q, k, positions)
    assert q_rot.dtype == k_rot.dtype == torch.float64
    torch.testing.assert_close(q_rot[..., :r], q_hf, rtol=0, atol=1e-12)
    torch.testing.assert_close(k_rot[..., :r], k_hf, rtol=0, atol=1e-12)


# --- invariants ------------------------------------------------------------------------------


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (96, 48), (59, 32)])
@pytest.mark.parametrize("name", sorted(STATIC_SCALINGS))
def test_interleaved_is_half_split_with_permuted_dims(name, head_dim, rotary_dim, gen):
    scaling = STATIC_SCALINGS[name]
    half = RotaryEmbedding(head_dim, 1e4, rotary_dim=rotary_dim, scaling=scaling)
    inter = RotaryEmbedding(head_dim, 1e4, rotary_dim=rotary_dim, scaling=scaling, interleaved=True)
    perm = interleave_perm(head_dim, rotary_dim)
    positions = torch.randint(0, 10_000, (2, 33), generator=gen)
    q, k = qk(gen, head_dim=head_dim)
    q_half, k_half = half(q, k, positions)
    q_inter, k_inter = inter(q[..., perm], k[..., perm], positions)  # the GGUF layout
    torch.testing.assert_close(q_inter, q_half[..., perm], rtol=0, atol=1e-12)
    torch.testing.assert_close(k_inter, k_half[..., perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("name", sorted(STATIC_SCALINGS))
def test_rotation_preserves_norms(name, interleaved, gen):
    head_dim, r = 96, 64
    rope = RotaryEmbedding(
        head_dim, 1e4, rotary_dim=r, scaling=STATIC_SCALINGS[name], interleaved=interleaved
    )
    positions = torch.randint(0, 100_000, (33,), generator=gen)
    q, k = qk(gen, head_dim=head_dim)
    q_rot, _ = rope(q, k, positions)
    a = rope.attention_scaling  # cos and sin carry it: every pair's norm scales by it

    def pair_norms(x):
        return (
            x[..., 0:r:2].hypot(x[..., 1:r:2])
            if interleaved
            else x[..., : r // 2].hypot(x[..., r // 2 : r])
        )

    torch.testing.assert_close(pair_norms(q_rot), a * pair_norms(q), rtol=1e-12, atol=0)
    whole = q_rot[..., :r].norm(dim=-1)
    torch.testing.assert_close(whole, a * q[..., :r].norm(dim=-1), rtol=1e-12, atol=0)
    assert torch.equal(q_rot[..., r:], q[..., r:])


def relative_scores(rope, q, k, positions_q, positions_k):
    """q·k after RoPE, q and k placed at their own positions (one sequence)."""
    q_rot, _ = rope(q, q, positions_q)
    _, k_rot = rope(k, k, positions_k)
    return q_rot @ k_rot.transpose(-1, -2)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("name", sorted(STATIC_SCALINGS))
def test_scores_depend_only_on_relative_position(name, interleaved, gen):
    rope = RotaryEmbedding(
        96, 1e4, rotary_dim=64, scaling=STATIC_SCALINGS[name], interleaved=interleaved
    )
    q, k = qk(gen, batch=1, heads=3, kv_heads=3, seq=17, head_dim=96)
    pq = torch.randint(0, 50_000, (17,), generator=gen)
    pk = torch.randint(0, 50_000, (17,), generator=gen)
    before = relative_scores(rope, q, k, pq, pk)
    for shift in torch.randint(1, 50_000, (3,), generator=gen).tolist():
        after = relative_scores(rope, q, k, pq + shift, pk + shift)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-8)


def test_dynamic_scores_depend_only_on_relative_position_at_fixed_length(gen):
    scaling = DynamicNTKScaling(factor=2.0, original_max_position_embeddings=1024)
    rope = RotaryEmbedding(64, 1e4, scaling=scaling)
    length = 3000  # above the original length: grown frequencies, fixed by the last position
    q, k = qk(gen, batch=1, heads=2, kv_heads=2, seq=17, head_dim=64)
    last = torch.tensor([length - 1])
    pq = torch.randint(0, 1000, (16,), generator=gen)
    pk = torch.randint(0, 1000, (16,), generator=gen)

    def scores(shift):
        q_rot, _ = rope(q, q, torch.cat((pq + shift, last)))
        _, k_rot = rope(k, k, torch.cat((pk + shift, last)))
        return (q_rot @ k_rot.transpose(-1, -2))[..., :16, :16]

    before = scores(0)
    assert not torch.equal(rope.inv_freq_at(length), rope.inv_freq)
    for shift in [1, 517, length - 1000]:
        torch.testing.assert_close(scores(shift), before, rtol=0, atol=1e-9)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_partial_rotary_passes_the_other_dims_through(dtype, interleaved, gen):
    rope = RotaryEmbedding(111, 1e4, rotary_dim=40, interleaved=interleaved)
    q, k = qk(gen, head_dim=111, dtype=dtype)
    q_rot, k_rot = rope(q, k, torch.arange(33))
    assert torch.equal(q_rot[..., 40:], q[..., 40:]) and torch.equal(k_rot[..., 40:], k[..., 40:])
    assert not torch.equal(q_rot[..., 1:40], q[..., 1:40])


def test_positions_broadcast_gather_and_per_batch(gen):
    rope = rope_for("yarn", 64, 64)
    q, k = qk(gen, batch=3, seq=7)
    positions = torch.randint(0, 5000, (7,), generator=gen)
    q_1d, k_1d = rope(q, k, positions)
    q_2d, k_2d = rope(q, k, positions[None])
    q_b, _ = rope(q, k, positions.expand(3, 7))
    assert torch.equal(q_1d, q_2d) and torch.equal(k_1d, k_2d) and torch.equal(q_1d, q_b)
    # arbitrary positions = the same rows of a contiguous run
    table_cos, table_sin = rope.cos_sin(torch.arange(5000), torch.float64)
    cos, sin = rope.cos_sin(positions, torch.float64)
    assert torch.equal(cos, table_cos[positions]) and torch.equal(sin, table_sin[positions])
    # per-batch positions: each row as if called alone
    per_batch = torch.randint(0, 5000, (3, 7), generator=gen)
    q_pb, k_pb = rope(q, k, per_batch)
    for b in range(3):
        q_alone, k_alone = rope(q[b : b + 1], k[b : b + 1], per_batch[b])
        assert torch.equal(q_pb[b : b + 1], q_alone) and torch.equal(k_pb[b : b + 1], k_alone)


def test_strided_inputs_and_empty_sequence(gen):
    rope = RotaryEmbedding(64, 1e4)
    q, k = qk(gen, seq=10, head_dim=64)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # (batch, seq, heads, dim) storage
    positions = torch.arange(0, 20, 2)  # a strided view of a tensor
    torch.testing.assert_close(rope(q_t, k, positions)[0], rope(q, k, positions.clone())[0])
    q0, k0 = rope(q[:, :, :0], k[:, :, :0], torch.arange(0))
    assert q0.shape == (2, 9, 0, 64) and k0.shape == (2, 3, 0, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_within_twice_hf_style_error(dtype, gen):
    rope = rope_for("llama3", 128, 128)
    positions = torch.randint(0, 60_000, (2, 33), generator=gen)
    q, k = qk(gen, head_dim=128)
    q_ref, k_ref = rope(q, k, positions)  # float64 reference
    q_low, k_low = rope(q.to(dtype), k.to(dtype), positions)
    assert q_low.dtype == k_low.dtype == dtype
    cos, sin = rope.cos_sin(positions)  # the plain way: cos/sin cast to dtype, math in dtype
    cos, sin = torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)
    q_plain, k_plain = apply_rotary_pos_emb(q.to(dtype), k.to(dtype), cos, sin)
    for low, plain, ref in ((q_low, q_plain, q_ref), (k_low, k_plain, k_ref)):
        assert not low.isnan().any()
        assert (low.double() - ref).abs().max() <= 2 * (plain.double() - ref).abs().max()


# --- bad input and limits --------------------------------------------------------------------


def test_rotary_dim_limits():
    assert RotaryEmbedding(64, rotary_dim=64).inv_freq.shape == (32,)  # at the limit
    assert RotaryEmbedding(64, rotary_dim=2).inv_freq.shape == (1,)
    for bad in (66, 63, 0, 64.0):
        with pytest.raises(ValueError, match=r"rotary_dim must be an even integer in \[2, head"):
            RotaryEmbedding(64, rotary_dim=bad)
    with pytest.raises(ValueError, match="NTK scaling needs rotary_dim >= 4"):
        RotaryEmbedding(64, rotary_dim=2, scaling=NTKScaling(factor=2.0))
    RotaryEmbedding(64, rotary_dim=4, scaling=NTKScaling(factor=2.0))
    dynamic = DynamicNTKScaling(factor=2.0, original_max_position_embeddings=8)
    with pytest.raises(ValueError, match="NTK scaling needs rotary_dim >= 4"):
        RotaryEmbedding(64, rotary_dim=2, scaling=dynamic)


def test_head_dim_and_theta_limits():
    RotaryEmbedding(2)  # the smallest head that rotates whole
    with pytest.raises(ValueError, match=r"rotary_dim must be an even integer in \[2, head_dim=1"):
        RotaryEmbedding(1)
    with pytest.raises(ValueError, match=r"RotaryEmbedding.head_dim must be an integer >= 1"):
        RotaryEmbedding(0)
    RotaryEmbedding(64, theta=1.0001)  # theta must exceed 1
    for bad in (1.0, 0.5, -1e4, math.inf, math.nan):
        with pytest.raises(ValueError, match=r"RotaryEmbedding.theta must be a finite number > 1"):
            RotaryEmbedding(64, theta=bad)


def make(cls, **overrides):
    """A valid scaling of ``cls`` with some fields replaced."""
    base = {
        LinearScaling: {"factor": 2.0},
        NTKScaling: {"factor": 2.0},
        DynamicNTKScaling: {"factor": 2.0, "original_max_position_embeddings": 2048},
        YarnScaling: {"factor": 4.0, "original_max_position_embeddings": 2048},
        Llama3Scaling: dataclasses.asdict(HF_CASES["llama3"][1]),
    }[cls]
    return cls(**{**base, **overrides})


ALL_SCALINGS = [LinearScaling, NTKScaling, DynamicNTKScaling, YarnScaling, Llama3Scaling]


@pytest.mark.parametrize("cls", ALL_SCALINGS, ids=lambda c: c.__name__)
def test_factor_limit(cls):
    rope = RotaryEmbedding(64, scaling=make(cls, factor=1.0))  # at the limit: no scaling
    torch.testing.assert_close(rope.inv_freq, RotaryEmbedding(64).inv_freq, rtol=1e-6, atol=0)
    assert rope.attention_scaling == 1.0
    for bad in (0.99, 0.0, -2.0, math.nan, math.inf, "2.0", True):
        with pytest.raises(
            ValueError, match=rf"{cls.__name__}.factor must be a finite number >= 1"
        ):
            make(cls, factor=bad)


@pytest.mark.parametrize("cls", [DynamicNTKScaling, YarnScaling, Llama3Scaling])
def test_original_max_position_embeddings_limit(cls):
    make(cls, original_max_position_embeddings=1)
    for bad in (0, -8, 8192.0, None):
        with pytest.raises(ValueError, match=rf"{cls.__name__}.original_max_position_embeddings"):
            make(cls, original_max_position_embeddings=bad)


def test_yarn_parameter_limits():
    make(YarnScaling, beta_slow=1e-3, beta_fast=1.001e-3)  # just inside both limits
    with pytest.raises(ValueError, match=r"YarnScaling.beta_slow must be a finite number > 0"):
        make(YarnScaling, beta_slow=0.0)
    with pytest.raises(
        ValueError, match=r"YarnScaling.beta_fast must be a finite number > beta_slow=2.0, got 2.0"
    ):
        make(YarnScaling, beta_slow=2.0, beta_fast=2.0)
    for name in ("mscale", "mscale_all_dim", "attention_factor"):
        make(YarnScaling, **{"mscale": 1.0, "mscale_all_dim": 1.0, name: 1e-6})
        with pytest.raises(ValueError, match=rf"YarnScaling.{name} must be a finite number > 0"):
            make(YarnScaling, **{"mscale": 1.0, "mscale_all_dim": 1.0, name: 0.0})
    with pytest.raises(ValueError, match=r"YarnScaling.mscale=1.0 and YarnScaling.mscale_all_dim"):
        make(YarnScaling, mscale=1.0)
    with pytest.raises(ValueError, match=r"YarnScaling.truncate must be a bool"):
        make(YarnScaling, truncate=1)


def test_yarn_attention_scaling_defaults():
    assert make(YarnScaling, factor=4.0).attention_scaling == pytest.approx(0.1 * math.log(4) + 1)
    same = make(YarnScaling, factor=40.0, mscale=0.707, mscale_all_dim=0.707)
    assert same.attention_scaling == pytest.approx(1.0)  # DeepSeek-V3's pair cancels
    assert make(YarnScaling, attention_factor=0.5).attention_scaling == 0.5


def test_llama3_frequency_factor_limits():
    make(Llama3Scaling, low_freq_factor=1.0, high_freq_factor=1.5)
    with pytest.raises(
        ValueError, match=r"Llama3Scaling.high_freq_factor must be .* > low_freq_factor=1.0"
    ):
        make(Llama3Scaling, low_freq_factor=1.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"Llama3Scaling.low_freq_factor must be .* > 0"):
        make(Llama3Scaling, low_freq_factor=0.0)


def test_scalings_are_frozen_and_keyword_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make(LinearScaling).factor = 3.0
    with pytest.raises(TypeError):
        LinearScaling(2.0)


def test_from_hf_bad_dicts():
    for none in (None, {}, {"rope_type": "default", "rope_theta": 1e4}):
        assert RopeScaling.from_hf(none) == RopeScaling()
    with pytest.raises(ValueError, match=r"unknown RoPE scaling type 'longrope'; allowed: \["):
        RopeScaling.from_hf({"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown RoPE scaling type 'su'") as error:
        RopeScaling.from_hf({"type": "su"})
    for kind in ("default", "linear", "ntk", "dynamic", "yarn", "llama3"):
        assert repr(kind) in str(error.value)
    with pytest.raises(ValueError, match="disagree"):
        RopeScaling.from_hf({"rope_type": "yarn", "type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match=r"'linear' RoPE scaling needs \['factor'\]"):
        RopeScaling.from_hf({"rope_type": "linear"})
    with pytest.raises(
        ValueError, match=r"'dynamic' RoPE scaling needs \['original_max_position_emb"
    ):
        RopeScaling.from_hf({"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=r"LinearScaling.factor must be a finite number >= 1"):
        RopeScaling.from_hf({"rope_type": "linear", "factor": 0.5})
    # like HF, dynamic NTK takes the model's length over the dict's; the dict's when alone
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256}
    assert (
        RopeScaling.from_hf(dynamic, max_position_embeddings=512).original_max_position_embeddings
        == 512
    )
    assert RopeScaling.from_hf(dynamic).original_max_position_embeddings == 256
    # like HF: a missing original length defaults to the model's max_position_embeddings
    yarn = RopeScaling.from_hf({"rope_type": "yarn", "factor": 2.0}, max_position_embeddings=512)
    assert yarn == YarnScaling(factor=2.0, original_max_position_embeddings=512)


def test_bad_positions(gen):
    rope = RotaryEmbedding(64)
    q, k = qk(gen, batch=2, seq=5)
    with pytest.raises(ValueError, match="positions must be >= 0, got minimum -1"):
        rope(q, k, torch.tensor([3, 4, -1, 5, 6]))
    rope(q, k, torch.tensor([3, 4, 0, 5, 6]))  # zero is the limit
    with pytest.raises(ValueError, match="positions must be an integer tensor"):
        rope(q, k, torch.arange(5.0))
    with pytest.raises(ValueError, match="positions must be an integer tensor"):
        rope.cos_sin(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"positions must be \(seq,\) or \(batch, seq\)"):
        rope.cos_sin(torch.zeros(1, 2, 5, dtype=torch.long))
    for bad in (torch.arange(4), torch.arange(6), torch.zeros(3, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"positions must be \(5,\) or \(2 or 1, 5\)"):
            rope(q, k, bad)
    with pytest.raises(ValueError, match="dtype must be a floating dtype"):
        rope.cos_sin(torch.arange(5), torch.int32)


def test_bad_query_and_key_shapes(gen):
    rope = RotaryEmbedding(64)
    q, k = qk(gen, batch=2, seq=5)
    positions = torch.arange(5)
    with pytest.raises(ValueError, match=r"q must be \(batch, heads, seq, head_dim=64\)"):
        rope(q[..., :62], k, positions)
    with pytest.raises(ValueError, match=r"k must be \(batch, heads, seq, head_dim=64\)"):
        rope(q, torch.cat((k, k[..., :2]), -1), positions)
    with pytest.raises(ValueError, match=r"q must be \(batch, heads, seq, head_dim=64\)"):
        rope(q[0], k, positions)
    with pytest.raises(ValueError, match="differ in batch or seq"):
        rope(q, k[:, :, :4], positions)
    with pytest.raises(ValueError, match="differ in batch or seq"):
        rope(q, k[:1], positions)


def test_apply_rotary_leaves_unrotated_tail(gen):
    x = torch.randn(1, 2, 3, 10, generator=gen, dtype=torch.float64)
    cos, sin = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    assert torch.equal(apply_rotary(x, cos, sin), x)  # angle 0 is the identity
    quarter = apply_rotary(x, torch.zeros(3, 2, dtype=torch.float64), -cos, interleaved=True)
    assert torch.equal(quarter[..., 0:4:2], x[..., 1:4:2])  # a -90 degree turn: (a, b) -> (b, -a)
    assert torch.equal(quarter[..., 1:4:2], -x[..., 0:4:2])
    assert torch.equal(quarter[..., 4:], x[..., 4:])


def test_device_mismatch():
    rope = RotaryEmbedding(64)
    q = torch.empty(1, 2, 5, 64, device="meta")
    with pytest.raises(ValueError, match="q, k, positions on different devices"):
        rope(q, q, torch.arange(5))
    with pytest.raises(ValueError, match="q, k, positions on different devices"):
        rope(q, torch.zeros(1, 2, 5, 64), torch.arange(5, device="meta"))


@pytest.mark.parametrize("extra", [{"mscale": 0.707}, {"mscale_all_dim": 0.707}, {"mscale": 0}])
def test_from_hf_ignores_a_lone_or_zero_mscale_like_hf(extra):
    """HF applies mscale only as a non-zero pair; such checkpoint configs must still load."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    scaling = RopeScaling.from_hf(params | extra)
    assert scaling == YarnScaling(factor=4.0, original_max_position_embeddings=2048)
    config = LlamaConfig(
        head_dim=64,
        hidden_size=512,
        num_attention_heads=8,
        max_position_embeddings=8192,
        rope_parameters={"rope_theta": 10000.0} | params | extra,
    )
    _, hf_scaling = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    assert scaling.attention_scaling == pytest.approx(hf_scaling, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("positions_shape", [(7,), (3, 7)])
def test_phasor_rotation_equals_the_real_valued_one(dtype, positions_shape, gen):
    # The complex multiply is the same two products and one sum per output: equal up to
    # rounding of float32 products (2 ulp of the inputs' scale).
    rope = RotaryEmbedding(64, 1e4, interleaved=True)
    positions = torch.randint(0, 5000, positions_shape, generator=gen)
    cos, sin = rope.cos_sin(positions, dtype)
    x = torch.randn(3, 12, 7, 64, generator=gen, dtype=dtype).transpose(1, 2).transpose(1, 2)
    phasors = rotation_phasors(cos, sin)
    fast = apply_rotary(x, cos, sin, interleaved=True, phasors=phasors)
    plain = apply_rotary(x, cos, sin, interleaved=True)
    tol = 4 * torch.finfo(dtype).eps * x.abs().max().item()
    torch.testing.assert_close(fast, plain, rtol=0, atol=tol)
    # the same angles, rotated in float64 (the angles' own rounding is not the rotation's)
    exact = apply_rotary(x.double(), cos.double(), sin.double(), interleaved=True)
    torch.testing.assert_close(fast.double(), exact, rtol=0, atol=2 * tol)


def test_phasors_fall_back_where_the_complex_view_cannot_apply(gen):
    rope = RotaryEmbedding(64, 1e4, rotary_dim=32, interleaved=True)
    cos, sin = rope.cos_sin(torch.arange(5))
    phasors = rotation_phasors(cos, sin)
    partial = torch.randn(1, 2, 5, 64, generator=gen)  # half the dims rotate
    odd = torch.randn(1, 2, 5, 33, generator=gen)[..., 1:]  # odd offset and strides
    for x in (partial, odd):
        plain = apply_rotary(x, cos, sin, interleaved=True)
        assert torch.equal(apply_rotary(x, cos, sin, interleaved=True, phasors=phasors), plain)
    half_cos, half_sin = cos.half(), sin.half()
    assert rotation_phasors(half_cos, half_sin) is None  # half precision keeps the real form
