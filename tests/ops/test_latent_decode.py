"""latent_decode (absorbed MLA decode): torch path and Triton kernel against a float64 oracle.

The oracle is written from the definition, one sequence and head at a time. The `triton`
backend runs its real kernel: on CUDA where there is one, otherwise in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), so its head tiles, context
splits, ragged lengths and the merge by log-sum-exp are checked in CI on CPU.

Tolerances: float64 torch path 1e-12; float32 (torch or kernel) 2e-5, float32 sums over
up to ~300 keys of O(1) terms; float16 kernel 2e-2 (inputs rounded to 11 bits).
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.ops.latent_decode import latent_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_problem(batch, heads, rank, rope, kv_len, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return (
        draw(batch, heads, rank),
        draw(batch, heads, rope),
        draw(batch, kv_len, rank),
        draw(batch, kv_len, rope),
    )


def oracle(q_latent, q_rope, latent, k_rope, lengths, scale):
    q_latent, q_rope, latent, k_rope = (
        t.double().cpu() for t in (q_latent, q_rope, latent, k_rope)
    )
    b, h, rank = q_latent.shape
    out = torch.zeros(b, h, rank, dtype=torch.float64)
    lse = torch.full((b, h), -math.inf, dtype=torch.float64)
    for i in range(b):
        n = int(lengths[i])
        if n == 0:
            continue
        for head in range(h):
            scores = (latent[i, :n] @ q_latent[i, head] + k_rope[i, :n] @ q_rope[i, head]) * scale
            lse[i, head] = torch.logsumexp(scores, 0)
            out[i, head] = torch.softmax(scores, 0) @ latent[i, :n]
    return out, lse


# (batch, heads, kv_rank, rope_dim, lengths): DeepSeek-like 16 heads / 512 + 64 scaled down,
# heads that fill no 16-row tile, ranks that are no power of two, empty and ragged sequences
CASES = [
    (1, 16, 32, 16, [1]),
    (2, 9, 23, 8, [97, 40]),
    (3, 20, 59, 6, [0, 130, 7]),
    (1, 1, 16, 4, [300]),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=[f"b{c[0]}h{c[1]}r{c[2]}p{c[3]}" for c in CASES])
def test_latent_decode_matches_the_float64_oracle(backend, case):
    batch, heads, rank, rope, lengths = case
    kv_len = max(lengths)
    inputs = make_problem(batch, heads, rank, rope, kv_len, seed=sum(lengths))
    lengths = torch.tensor(lengths)
    want, want_lse = oracle(*inputs, lengths, 0.2)
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    args = [t.to(DEVICE, dtype) for t in inputs]
    out, lse = latent_decode(*args, lengths, scale=0.2, backend=backend, return_lse=True)
    assert out.dtype == dtype and out.shape == want.shape
    assert (out.cpu().double() - want).abs().max() < tol
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu().double()[finite] - want_lse[finite]).abs().max() < tol * 10
    if (lengths == 0).any():
        assert torch.equal(out[lengths == 0].cpu(), torch.zeros_like(out[lengths == 0].cpu()))


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_every_split_count_gives_the_same_answer(splits):
    from attnkit.ops.triton_latent import triton_latent_decode

    inputs = [t.to(DEVICE, torch.float32) for t in make_problem(2, 9, 24, 8, 150, seed=3)]
    lengths = torch.tensor([150, 61])
    want, _ = oracle(*inputs, lengths, 0.3)
    out, _ = triton_latent_decode(*inputs, lengths.to(DEVICE), 0.3, num_splits=splits)
    assert (out.cpu().double() - want).abs().max() < 2e-5


def test_float16_kernel_matches_the_oracle():
    inputs = [t.to(DEVICE) for t in make_problem(2, 16, 32, 16, 70, seed=5, dtype=torch.float16)]
    lengths = torch.tensor([70, 33])
    want, _ = oracle(*inputs, lengths, 0.15)
    out = latent_decode(*inputs, lengths, scale=0.15, backend="triton")
    assert out.dtype == torch.float16
    assert (out.cpu().double() - want).abs().max() < 2e-2


def test_nan_in_latents_past_a_sequence_length_is_never_read():
    inputs = [t.float() for t in make_problem(2, 9, 24, 8, 50, seed=7)]
    lengths = torch.tensor([50, 20])
    clean = latent_decode(*inputs, lengths, scale=0.3, backend="triton")
    inputs[2][1, 20:], inputs[3][1, 20:] = math.nan, math.nan  # unused cache slots
    for backend in ("torch", "triton"):
        poisoned = latent_decode(*inputs, lengths, scale=0.3, backend=backend)
        assert not torch.isnan(poisoned).any(), backend
        assert (poisoned - clean).abs().max() < 2e-5, backend


def test_default_lengths_cover_every_key():
    inputs = make_problem(2, 4, 16, 4, 12, seed=9)
    full = latent_decode(*inputs, torch.tensor([12, 12]), scale=0.5)
    assert torch.equal(latent_decode(*inputs, scale=0.5), full)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            dict(backend="fast"),
            ValueError,
            "backend must be one of auto, torch, triton; got 'fast'",
        ),
        (dict(q_rope=torch.zeros(2, 4, 5)), ValueError, r"q_rope must be \(2, 4, 4\)"),
        (dict(latent=torch.zeros(2, 12, 15)), ValueError, r"latent must be \(2, 12, 16\)"),
        (dict(k_rope=torch.zeros(2, 11, 4)), ValueError, r"k_rope must be \(2, 12, 4\)"),
        (dict(latent=[[0.0]]), TypeError, "latent must be a torch.Tensor, got list"),
        (dict(q_latent=torch.zeros(2, 4, 16, 1)), ValueError, "q_latent must have 3 dims"),
        (dict(k_rope=torch.zeros(2, 12, 4, dtype=torch.float64)), ValueError, "k_rope must match"),
        (
            dict(lengths=torch.tensor([3])),
            ValueError,
            r"lengths must be an integer tensor of shape \(2,\)",
        ),
        (dict(lengths=torch.tensor([3.0, 1.0])), ValueError, "lengths must be an integer tensor"),
        (dict(lengths=torch.tensor([13, 1])), ValueError, r"lengths must lie in \[0, kv_len=12\]"),
        (dict(lengths=torch.tensor([-1, 1])), ValueError, r"lengths must lie in \[0, kv_len=12\]"),
        (
            dict(backend="triton", dtype=torch.float64),
            ValueError,
            "triton kernels take float32, float16 or bfloat16, got torch.float64",
        ),
    ],
)
def test_bad_inputs_name_the_argument(change, error, message):
    names = ("q_latent", "q_rope", "latent", "k_rope")
    dtype = change.pop("dtype", torch.float32)
    args = dict(zip(names, make_problem(2, 4, 16, 4, 12, dtype=dtype), strict=True))
    args["lengths"] = torch.tensor([12, 5])
    args.update(change)
    with pytest.raises(error, match=message):
        latent_decode(**args, scale=0.25)


def test_exactly_at_the_length_limit_passes():
    inputs = [t.float() for t in make_problem(1, 4, 16, 4, 12)]
    out = latent_decode(*inputs, torch.tensor([12]), scale=0.25)  # lengths == kv_len: allowed
    assert torch.isfinite(out).all()
