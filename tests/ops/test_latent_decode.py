"""latent_decode (absorbed MLA decode): torch path and Triton kernel against a float64 oracle.

The oracle is written from the definition, one sequence and head at a time. The `triton`
backend runs its real kernel: on CUDA where there is one, otherwise in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), so its head tiles, context
splits, ragged lengths and the merge by log-sum-exp are checked in CI on CPU.

Tolerances: the float64 torch path 1e-12 against the oracle; the kernel, in float32 and
float16, the 2x rule (its error against the oracle at most twice the plain torch path's
in the same dtype, plus the dtype's noise floor).
"""

from __future__ import annotations

import math

import pytest
import torch

from attn_testing import NOISE_FLOOR, max_err
from attnkit.ops.latent_decode import latent_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = NOISE_FLOOR[torch.float32]


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
    args = [t.to(DEVICE, dtype) for t in inputs]
    out, lse = latent_decode(*args, lengths, scale=0.2, backend=backend, return_lse=True)
    assert out.dtype == dtype and out.shape == want.shape
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    if dtype == torch.float64:  # the torch path in float64 is the definition, to rounding
        assert (out - want).abs().max() < 1e-12
        assert (lse[finite] - want_lse[finite]).abs().max() < 1e-12
        return
    # the 2x rule: the kernel's error at most twice the plain float32 torch path's
    plain, plain_lse = latent_decode(
        *(t.float() for t in inputs), lengths, scale=0.2, backend="torch", return_lse=True
    )
    err, plain_err = max_err(out.cpu(), want), max_err(plain, want)
    assert err <= 2 * plain_err + FLOOR, f"output error {err:.3g} > 2 x {plain_err:.3g}"
    lse_err = max_err(lse.cpu()[finite], want_lse[finite])
    assert lse_err <= 2 * max_err(plain_lse[finite], want_lse[finite]) + FLOOR
    if (lengths == 0).any():
        assert torch.equal(out[lengths == 0].cpu(), torch.zeros_like(out[lengths == 0].cpu()))


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_every_split_count_gives_the_same_answer(splits):
    from attnkit.ops.triton_latent import triton_latent_decode

    inputs = [t.to(DEVICE, torch.float32) for t in make_problem(2, 9, 24, 8, 150, seed=3)]
    lengths = torch.tensor([150, 61])
    want, want_lse = oracle(*inputs, lengths, 0.3)
    plain, plain_lse = latent_decode(
        *(t.cpu() for t in inputs), lengths, scale=0.3, return_lse=True
    )
    out, lse = triton_latent_decode(*inputs, lengths.to(DEVICE), 0.3, num_splits=splits)
    assert max_err(out.cpu(), want) <= 2 * max_err(plain, want) + FLOOR
    assert max_err(lse.cpu(), want_lse) <= 2 * max_err(plain_lse, want_lse) + FLOOR


def test_float16_kernel_matches_the_oracle():
    inputs = [t.to(DEVICE) for t in make_problem(2, 16, 32, 16, 70, seed=5, dtype=torch.float16)]
    lengths = torch.tensor([70, 33])
    want, _ = oracle(*inputs, lengths, 0.15)
    out = latent_decode(*inputs, lengths, scale=0.15, backend="triton")
    plain = latent_decode(*(t.cpu() for t in inputs), lengths, scale=0.15, backend="torch")
    assert out.dtype == torch.float16
    floor = NOISE_FLOOR[torch.float16]
    assert max_err(out.cpu(), want) <= 2 * max_err(plain, want) + floor


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
        (dict(lengths=torch.tensor([True, False])), ValueError, "integer tensor .* got torch.bool"),
        (dict(scale=0.0), ValueError, "scale must be a positive finite number, got 0.0"),
        (dict(scale="big"), TypeError, "scale must be a number, got str"),
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
    args["scale"] = 0.25
    args.update(change)
    with pytest.raises(error, match=message):
        latent_decode(**args)


def test_exactly_at_the_length_limit_passes():
    inputs = [t.float() for t in make_problem(1, 4, 16, 4, 12)]
    out = latent_decode(*inputs, torch.tensor([12]), scale=0.25)  # lengths == kv_len: allowed
    assert torch.isfinite(out).all()


@torch.no_grad()
def test_gradients_are_refused_by_triton_and_auto_falls_back_to_torch():
    inputs = [t.float().requires_grad_(True) for t in make_problem(1, 4, 16, 4, 9)]
    with torch.enable_grad():
        with pytest.raises(ValueError, match="has no backward, but an input requires grad"):
            latent_decode(*inputs, scale=0.3, backend="triton")
        out = latent_decode(*inputs, scale=0.3)  # auto: torch, which has a backward
        out.sum().backward()
    assert inputs[0].grad is not None and torch.isfinite(inputs[0].grad).all()


LATENT_OFFSETS_PAST_INT32 = """
import torch
from attnkit.ops.latent_decode import latent_decode
device = "cuda" if torch.cuda.is_available() else "cpu"
# sequence b's latents start 2^30 * b elements in (past int32 from b = 2, while the stride
# itself fits an int32); only token 0 of each is read, so only it is touched
latent = torch.empty(3, 2**26, 16, dtype=torch.float16, device=device)
k_rope = torch.empty(3, 2**26, 16, dtype=torch.float16, device=device)
k_rope[:, 0] = 0.0
latent[:, 0] = torch.tensor([1.0, 2.0, 3.0], device=device).view(3, 1).half()
q = torch.ones(3, 16, 16, dtype=torch.float16, device=device)
lengths = torch.ones(3, dtype=torch.long)
out = latent_decode(q, q, latent, k_rope, lengths, scale=0.25, backend="triton")
print(out[:, 0, 0].tolist())
"""


@pytest.mark.slow
def test_batch_offsets_past_2_to_the_31_elements_do_not_wrap():
    """Regression: the kernel's batch offsets were int32 products (a wrapped offset is a
    crash in the interpreter, a wrong read on a GPU): run in a process of its own."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", LATENT_OFFSETS_PAST_INT32],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1.0, 2.0, 3.0]"
