"""LatentAttention (MLA): naive = absorbed = an explicit float64 reference; cache decoding."""

from __future__ import annotations

import math

import pytest
import torch

from attn_testing import (
    NOISE_FLOOR,
    assert_ragged_batch_decodes_as_alone,
    max_err,
    tiny_transformer,
)
from attnkit.cache import ContiguousCache
from attnkit.cache.latent import LatentCache
from attnkit.engine import generate
from attnkit.layers.attention import AttentionContext
from attnkit.layers.latent import LatentAttention
from attnkit.layers.rope import RotaryEmbedding
from attnkit.models.llama import Transformer
from attnkit.ops.masks import causal

THETA = 1000.0
# (name, kwargs): awkward sizes, low-rank queries or not, 1 or 3 RoPE heads, v dim != qk dim
CASES = {
    "deepseek": dict(kv_rank=23, rope_dim=8, nope_dim=11, v_head_dim=13, q_rank=17),
    "rope-heads-3": dict(kv_rank=19, rope_dim=6, nope_dim=7, v_head_dim=5, rope_heads=3),
    "no-nope-no-norm": dict(kv_rank=9, rope_dim=10, nope_dim=0, v_head_dim=59, kv_norm=False),
    "q-rank-no-norm": dict(
        kv_rank=31, rope_dim=4, nope_dim=59, v_head_dim=7, q_rank=5, q_norm=False, rope_heads=9
    ),
    "picked-pairs": dict(kv_rank=12, rope_dim=6, nope_dim=3, v_head_dim=8, rope_pairs=(4, 0, 4)),
}


def layer(case: str, seed: int = 0, mode: str = "naive", **extra) -> LatentAttention:
    torch.manual_seed(seed)
    mla = LatentAttention(0, 54, 9, mode=mode, **(CASES[case] | extra)).double()
    for p in mla.parameters():  # non-trivial norm weights and biases too
        torch.nn.init.normal_(p, std=0.3)
    return mla


def rotate(x, angles, interleaved):
    """RoPE written independently of attnkit: pairs as complex numbers times e^(i·angle)."""
    half = x.shape[-1] // 2
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    z = torch.complex(a, b) * torch.polar(torch.ones_like(angles), angles)
    if interleaved:
        return torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    return torch.cat([z.real, z.imag], dim=-1)


def rms(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def reference(mla: LatentAttention, x, positions, interleaved):
    """MLA head by head from its definition, float64, causal, softmax spelled out."""
    b, t, _ = x.shape
    h, nope, rope, vd = mla.n_heads, mla.nope_dim, mla.rope_dim, mla.v_head_dim
    lin = torch.nn.functional.linear
    if mla.q_rank is None:
        q = lin(x, mla.wq.weight, mla.wq.bias)
    else:
        low = lin(x, mla.wq_a.weight)
        low = rms(low, mla.q_norm.weight, mla.q_norm.eps) if mla.q_norm is not None else low
        q = lin(low, mla.wq_b.weight, mla.wq_b.bias)
    q = q.view(b, t, h, nope + rope)
    kv = lin(x, mla.wkv_a.weight, mla.wkv_a.bias)
    c, k_rope = kv[..., : mla.kv_rank], kv[..., mla.kv_rank :].view(b, t, mla.rope_heads, rope)
    if mla.kv_norm is not None:
        c = rms(c, mla.kv_norm.weight, mla.kv_norm.eps)
    inv_freq = RotaryEmbedding(16, THETA).inv_freq.double()  # float32 values, as the model's
    angles = positions[:, None].double() * inv_freq[list(mla.rope_pairs)]  # (t, rope/2)
    angles = angles[None, :, None]  # broadcast over batch and heads
    w = mla.wkv_b.weight.view(h, nope + vd, mla.kv_rank)
    out = torch.zeros(b, t, h, vd, dtype=torch.float64)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    for head in range(h):
        k_nope, v = c @ w[head, :nope].T, c @ w[head, nope:].T  # (b, t, ·)
        kr = rotate(k_rope[:, :, head // (h // mla.rope_heads)], angles[:, :, 0], interleaved)
        qr = rotate(q[:, :, head, nope:], angles[:, :, 0], interleaved)
        scores = q[:, :, head, :nope] @ k_nope.transpose(1, 2) + qr @ kr.transpose(1, 2)
        weights = (scores * mla.scale).masked_fill(future, -math.inf).softmax(-1)
        out[:, :, head] = weights @ v
    return lin(out.flatten(2), mla.wo.weight, mla.wo.bias)


def context(t, interleaved, dtype=torch.float64, cache=None):
    cos, sin = RotaryEmbedding(16, THETA).cos_sin(torch.arange(t), dtype)  # 8 angle columns
    return AttentionContext(cos, sin, causal(), cache, interleaved)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(("t", "interleaved"), [(1, False), (7, True), (97, False)])
def test_naive_and_absorbed_equal_the_float64_reference(case, t, interleaved):
    mla = layer(case)
    x = torch.randn(2, t, 54, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    want = reference(mla, x, torch.arange(t), interleaved)
    ctx = context(t, interleaved)
    naive = mla(x, ctx)
    mla.mode = "absorbed"
    absorbed = mla(x, ctx)
    # float64 all the way: only summation order differs
    assert max_err(naive, want) < 1e-12 and max_err(absorbed, want) < 1e-12
    assert max_err(naive, absorbed) < 1e-12


@pytest.mark.parametrize("case", ["deepseek", "rope-heads-3"])
def test_float32_absorbed_is_as_accurate_as_float32_naive(case):
    """The tolerance rule with naive as the plain implementation (both against float64)."""
    mla64 = layer(case)
    x = torch.randn(2, 33, 54, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = mla64(x, context(33, False))
    mla32 = layer(case).float()
    ctx32 = context(33, False, torch.float32)
    plain = mla32(x.float(), ctx32)
    mla32.mode = "absorbed"
    got = mla32(x.float(), ctx32)
    assert not torch.isnan(got).any()
    floor = NOISE_FLOOR[torch.float32] * want.abs().max().item()
    assert max_err(got, want) <= 2 * max_err(plain, want) + floor


def test_future_tokens_do_not_change_earlier_outputs():
    mla = layer("deepseek", mode="absorbed")
    x = torch.randn(1, 16, 54, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    changed = x.clone()
    changed[:, 9:] += 1.0
    ctx = context(16, False)
    assert torch.equal(mla(x, ctx)[:, :9], mla(changed, ctx)[:, :9])
    assert not torch.allclose(mla(x, ctx)[:, 9:], mla(changed, ctx)[:, 9:])


# -- through a model and its cache --------------------------------------------------------------
def tiny_mla(mode: str, case: str = "deepseek", seed: int = 0, **config) -> Transformer:
    def factory(cfg, i):
        return LatentAttention(
            i, cfg.hidden_size, cfg.num_attention_heads, mode=mode, **CASES[case]
        )

    # head_dim 16: cos/sin for 8 angle columns, which rope_pairs index
    return tiny_transformer(seed, factory, **({"head_dim": 16, "rope_theta": THETA} | config))


@pytest.mark.parametrize("chunks", [[10, 4, 6], [1] * 20, [19, 1]], ids=str)
@pytest.mark.parametrize("mode", ["naive", "absorbed", "auto"])
@pytest.mark.parametrize("case", ["deepseek", "rope-heads-3", "picked-pairs"])
@torch.no_grad()
def test_decoding_through_the_latent_cache_equals_one_full_forward(case, mode, chunks):
    model = tiny_mla(mode, case, rope_interleaved=case == "rope-heads-3")
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache, pieces, start = model.new_cache(2, initial_len=8), [], 0  # forces growth too
    assert isinstance(cache, LatentCache)
    for n in chunks:
        pieces.append(model(ids[:, start : start + n], cache=cache))
        start += n
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-12
    assert cache.length(0) == cache.length(1) == 20


def test_auto_mode_absorbs_for_decoding_and_up_projects_for_prefill():
    # DeepSeek-V2-Lite's attention: 16 heads, latent 512, RoPE 64, nope 128, v 128.
    mla = LatentAttention(
        0, 2048, 16, kv_rank=512, rope_dim=64, nope_dim=128, v_head_dim=128, q_rank=None
    )
    assert mla.mode == "auto"
    assert mla.step_mode(1, 4096) == "absorbed"  # decode: never build per-head K/V
    assert mla.step_mode(4096, 4096) == "naive"  # prefill: attend over 192-dim heads
    mla.mode = "absorbed"
    assert mla.step_mode(4096, 4096) == "absorbed"  # an explicit mode is obeyed
    # the tiny case the decoding test runs takes both paths with its [19, 1] chunks
    tiny = layer("deepseek", mode="auto")
    assert (tiny.step_mode(19, 19), tiny.step_mode(1, 20)) == ("naive", "absorbed")


@pytest.mark.parametrize("mode", ["naive", "absorbed"])
@torch.no_grad()
def test_ragged_batch_decodes_each_sequence_as_if_alone(mode):
    model = tiny_mla(mode, "rope-heads-3")
    assert_ragged_batch_decodes_as_alone(model)  # float64 model: 1e-12


class LetterTokenizer:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids)


@torch.no_grad()
def test_generate_with_mla_layers_equals_uncached_greedy():
    model = tiny_mla("absorbed")
    prompts = [[5, 17, 3, 99, 42, 8, 1], [64, 2]]
    results = generate(model, LetterTokenizer(), prompts, max_new_tokens=6)
    for prompt, result in zip(prompts, results, strict=True):
        ids = list(prompt)
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        assert result.token_ids == ids[len(prompt) :]


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "uniform"])
@pytest.mark.parametrize("mode", ["auto", "absorbed"])
@torch.no_grad()
def test_triton_backend_decodes_like_the_torch_path(mode, ragged, monkeypatch):
    """backend="triton": prefill through the Triton attention kernel, decode steps through
    the fused MLA kernel (Triton's interpreter on CPU). A ragged (10 and 14 prompt tokens)
    or uniform batch, then 6 single steps; the 2x rule against the same model's float32
    torch path."""
    import attnkit.layers.latent as latent_module

    fused_calls = []
    real = latent_module.latent_decode

    def spy(*args, **kwargs):
        fused_calls.append(kwargs["backend"])
        return real(*args, **kwargs)

    monkeypatch.setattr(latent_module, "latent_decode", spy)
    exact = tiny_mla(mode)
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(4))
    # ragged: sequence 0 holds tokens 0-9 then 14-19, sequence 1 all 20 (a padding mask at
    # decode); uniform: both hold all 20 (no mask). Their uncached logits:
    first = torch.cat([ids[:1, :10], ids[:1, 14:]], dim=1) if ragged else ids[:1]
    want = torch.cat([exact(first)[:, -6:], exact(ids[1:])[:, 14:]])
    want_prefill = exact(ids[1:, :14])

    def decode(backend):
        model = tiny_mla(mode).float()
        for block in model.blocks:
            block.attn.backend = backend
        cache = model.new_cache(0, max_seqs=2)
        seqs = [cache.add_sequence() for _ in range(2)]
        logits = [model(ids[:1, : 10 if ragged else 14], cache=cache, seq_ids=[seqs[0]])]
        logits.append(model(ids[1:, :14], cache=cache, seq_ids=[seqs[1]]))
        rest = [model(ids[:, 14 + i : 15 + i], cache=cache) for i in range(6)]
        return torch.cat(rest, dim=1), logits

    plain, plain_prefill = decode("auto")
    assert not fused_calls
    got, prefill = decode("triton")
    assert fused_calls == ["triton"] * (6 * len(exact.blocks))  # every decode step, no prefill
    floor = NOISE_FLOOR[torch.float32] * want.abs().max().item()
    assert max_err(got, want) <= 2 * max_err(plain, want) + floor
    prefill_err = max_err(prefill[1], want_prefill)  # the Triton prefill kernel
    assert prefill_err <= 2 * max_err(plain_prefill[1], want_prefill) + floor


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(kv_rank=0), ValueError, "kv_rank must be an integer >= 1, got 0"),
        (dict(rope_dim=5), ValueError, "rope_dim must be an even integer >= 2, got 5"),
        (dict(rope_dim=0), ValueError, "rope_dim must be an even integer >= 2, got 0"),
        (dict(nope_dim=-1), ValueError, "nope_dim must be an integer >= 0, got -1"),
        (dict(rope_heads=2), ValueError, r"n_heads \(9\) must be a multiple of rope_heads \(2\)"),
        (dict(q_rank=0), ValueError, "q_rank must be an integer >= 1, got 0"),
        (dict(rope_pairs=(0, 1)), ValueError, "rope_pairs must be rope_dim/2 = 4 integers"),
        (dict(rope_pairs=(0, 1, 2, -1)), ValueError, "rope_pairs must be rope_dim/2 = 4"),
        (
            dict(mode="fast"),
            ValueError,
            r"mode must be one of \('auto', 'naive', 'absorbed'\), got 'fast'",
        ),
    ],
    ids=["rank", "odd-rope", "no-rope", "nope", "rope-heads", "q-rank", "pairs", "pair", "mode"],
)
def test_bad_constructor_arguments_name_the_problem(change, error, message):
    with pytest.raises(error, match=message):
        LatentAttention(0, 54, 9, **(CASES["deepseek"] | change))


def test_bad_mode_assignment_is_refused():
    mla = layer("deepseek")
    with pytest.raises(ValueError, match="mode must be one of"):
        mla.mode = "absorb"
    assert mla.mode == "naive"


def test_angles_for_too_few_rotary_dims_are_refused():
    mla = layer("picked-pairs")  # uses column 4
    cos, sin = RotaryEmbedding(8, THETA).cos_sin(torch.arange(3), torch.float64)  # 4 columns
    ctx = AttentionContext(cos, sin, causal(), None, False)
    with pytest.raises(ValueError, match="rope_pairs use angle column 4 but the context has 4"):
        mla(torch.zeros(1, 3, 54, dtype=torch.float64), ctx)


def test_wrong_input_shape_and_wrong_cache_kind():
    mla = layer("deepseek")
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, hidden=54\), got shape"):
        mla(torch.zeros(1, 3, 50, dtype=torch.float64), context(3, False))
    cache = ContiguousCache(1, 3, 16, dtype=torch.float64)
    cache.prepare([cache.add_sequence()], 3)
    with pytest.raises(TypeError, match="LatentAttention caches latents in a LatentCache"):
        mla(torch.zeros(1, 3, 54, dtype=torch.float64), context(3, False, cache=cache))
