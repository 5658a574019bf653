"""to_mla: exact at full rank, decodes through its latent cache, degrades as the rank shrinks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.layers.latent import MODES, LatentAttention
from attnkit.models.convert.mla import max_kv_rank, mla_kv_bytes_per_token, to_mla
from attnkit.tools.corpus import corpus_tokens
from models.test_llama import tiny

F32_EPS = torch.finfo(torch.float32).eps


def ids_for(seed: int, shape=(2, 19)) -> torch.Tensor:
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("rope_heads", "interleaved", "bias", "calibrated"),
    [
        (1, False, False, False),
        (3, True, False, True),
        (1, False, True, True),
        (3, True, True, False),
    ],
)
@torch.no_grad()
def test_full_rank_with_every_rotary_dim_is_exact_on_a_tiny_model(
    rope_heads, interleaved, bias, calibrated
):
    model = tiny(rope_interleaved=interleaved, attention_bias=bias, attention_out_bias=bias)
    before = copy.deepcopy(model.state_dict())
    ids = ids_for(0)
    want = model(ids)
    rank = max_kv_rank(model, rope_heads=rope_heads)
    converted = to_mla(
        model, rank, rope_heads=rope_heads, calibration=ids_for(1) if calibrated else None
    )
    assert all(isinstance(b.attn, LatentAttention) for b in converted.blocks)
    # float64 weights, but RMSNorm rounds through float32 (as Hugging Face's does)
    tolerance = 4 * F32_EPS * want.abs().max().item()
    for mode in ("absorbed", "naive"):
        for block in converted.blocks:
            block.attn.mode = mode
        assert (converted(ids) - want).abs().max() <= tolerance
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # input untouched


@pytest.mark.parametrize("rope_heads", [1, 3])
@torch.no_grad()
def test_a_compressed_model_decodes_through_its_cache_like_its_full_forward(rope_heads):
    model = tiny(rope_interleaved=True)  # head_dim 6: 3 rotary pairs per head
    converted = to_mla(model, 7, rope_dim=4 if rope_heads == 1 else 2, rope_heads=rope_heads)
    ids = ids_for(2, (2, 20))
    full = converted(ids)
    cache, pieces, start = converted.new_cache(2, initial_len=8), [], 0
    for n in (10, 4, 6):
        pieces.append(converted(ids[:, start : start + n], cache=cache))
        start += n
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-12
    per_token = 3 * (7 + 4) * 8 if rope_heads == 1 else 3 * (7 + 3 * 2) * 8  # 3 layers, float64
    assert mla_kv_bytes_per_token(converted) == per_token
    assert cache.nbytes == 2 * cache.capacity * per_token
    assert mla_kv_bytes_per_token(model) == 3 * 2 * 3 * 6 * 8  # the GQA original: K and V


# -- SmolLM2 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(smollm2):
    return corpus_tokens(smollm2[1], 1024)


def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token cross entropy) of one forward over `ids` (seq,)."""
    logits = model(ids[None])[0, :-1]
    return math.exp(F.cross_entropy(logits.double(), ids[1:]).item())


@torch.no_grad()
def test_full_rank_reproduces_smollm2_logits(smollm2, corpus):
    model, ids = smollm2[0], corpus[None, :96]
    want32 = model(ids)
    want64 = copy.deepcopy(model).double()(ids)
    noise = (want32 - want64).abs().max().item()  # the original's own float32 error
    for rope_heads, calibration, modes in ((3, None, ["absorbed"]), (1, corpus[512:640], MODES)):
        # Every rotary dim kept, V (192 rows) at full rank: the same function.
        rank = max_kv_rank(model, rope_heads=rope_heads)
        converted = to_mla(model, rank, rope_heads=rope_heads, calibration=calibration)
        layer = converted.blocks[0].attn
        assert (rank, layer.nope_dim, rope_heads * layer.rope_dim) == (192, 0, 192)
        for mode in modes:
            for block in converted.blocks:
                block.attn.mode = mode
            # float32 rounding of regrouped products (rope_heads=1 mixes the KV heads, so
            # its RoPE dot products run over 192 dims): within 3x the original's error.
            assert (converted(ids) - want64).abs().max().item() <= 3 * noise
        assert mla_kv_bytes_per_token(converted) == mla_kv_bytes_per_token(model) == 30 * 384 * 4


@torch.no_grad()
def test_smollm2_perplexity_grows_as_the_latent_rank_shrinks(smollm2, corpus):
    model = smollm2[0]
    evaluate, calibrate = corpus[:256], corpus[512:640]
    ranks = [32, 128, max_kv_rank(model, rope_dim=96)]  # 288 + 96 RoPE values: no compression
    results = []
    for rank in ranks:
        converted = to_mla(model, rank, rope_dim=96, calibration=calibrate)
        results.append((perplexity(converted, evaluate), mla_kv_bytes_per_token(converted)))
    ppl, sizes = zip(*results, strict=True)
    assert ppl[0] >= ppl[1] >= ppl[2], ppl
    assert sizes == tuple(30 * (rank + 96) * 4 for rank in ranks)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(kv_rank=0), ValueError, r"kv_rank must be an integer in \[1, 18\].*got 0"),
        (dict(kv_rank=19), ValueError, r"kv_rank must be an integer in \[1, 18\].*got 19"),
        (dict(kv_rank=33, rope_dim=4), ValueError, r"kv_rank must be an integer in \[1, 32\]"),
        (dict(kv_rank=4, rope_heads=2), ValueError, "rope_heads must be 1 .* or num_key_value"),
        (dict(kv_rank=4, rope_dim=3), ValueError, r"rope_dim must be an even integer in \[2, 18\]"),
        (dict(kv_rank=4, rope_dim=8, rope_heads=3), ValueError, r"even integer in \[2, 6\], got 8"),
        (dict(kv_rank=4, mode="fast"), ValueError, "mode must be one of"),
        (dict(kv_rank=4, rope_context=0), ValueError, "rope_context must be an integer >= 1"),
        (dict(kv_rank=4, calibration=torch.rand(5)), TypeError, "integer token ids, got dtype"),
        (dict(kv_rank=4, calibration=torch.tensor([1, 101])), ValueError, r"in \[0, 101\)"),
        (dict(kv_rank=4, calibration=torch.zeros(1, 1, 3).long()), ValueError, "non-empty"),
    ],
    ids=["zero", "above-max", "above-max-partial", "rope-heads", "odd", "too-wide", "mode",
         "context", "float-ids", "vocab", "3-d"],
)  # fmt: skip
def test_bad_arguments_name_the_problem(kwargs, error, message):
    with pytest.raises(error, match=message):
        to_mla(tiny(), **kwargs)


def test_only_gqa_transformers_convert():
    with pytest.raises(TypeError, match="model must be an attnkit Transformer"):
        to_mla(torch.nn.Linear(2, 2), 4)
    converted = to_mla(tiny(), 4)
    with pytest.raises(TypeError, match="layer 0 attention is LatentAttention"):
        to_mla(converted, 4)
