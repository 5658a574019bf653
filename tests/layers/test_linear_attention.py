"""LinearAttention in a Transformer: decoding through its state equals one full forward."""

from __future__ import annotations

import pytest
import torch

from attnkit.cache.contiguous import ContiguousCache
from attnkit.engine import generate
from attnkit.engine.speculative import speculative_generate
from attnkit.layers.attention import AttentionContext
from attnkit.layers.linear import LinearAttention
from attnkit.masks import causal, sliding_window
from attnkit.models.llama import LlamaConfig, Transformer
from attnkit.ops.linear import FEATURE_MAPS, feature_dim
from engine.test_generate import DigitTokenizer, plain_greedy

VOCAB = 101


def linear_model(seed=0, *, feature_map="elu", v_head_dim=None, dtype=torch.float64):
    """3 layers, 9 query heads over 3 KV heads of dim 6; chunk size 4 to split prefills oddly."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=54,
        intermediate_size=70,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
    )

    def attention(cfg, i):
        return LinearAttention(
            i,
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            v_head_dim=v_head_dim,
            feature_map=feature_map,
            chunk_size=4,
        )

    return Transformer(config, attention=attention).to(dtype).eval()


def tokens(seed, batch, n):
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "chunks", [[10, 4, 6], [1] * 20, [19, 1], [20]], ids=lambda c: "+".join(map(str, c))
)
@pytest.mark.parametrize("feature_map", list(FEATURE_MAPS))
@torch.no_grad()
def test_decoding_through_the_state_equals_one_full_forward(feature_map, chunks):
    model, ids = linear_model(feature_map=feature_map), tokens(1, 2, 20)
    full = model(ids)
    cache, pieces, start = model.new_cache(2), [], 0
    for n in chunks:
        pieces.append(model(ids[:, start : start + n], cache=cache))
        start += n
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-12
    assert cache.length(0) == cache.length(1) == 20


@torch.no_grad()
def test_a_ragged_batch_steps_together_and_equals_each_sequence_alone():
    model, ids = linear_model(2, feature_map="taylor"), tokens(2, 2, 14)
    cache = model.new_cache(2)
    model(ids[:1, :5], cache=cache, seq_ids=[0])  # sequence 0: 5 tokens
    model(ids[1:, :11], cache=cache, seq_ids=[1])  # sequence 1: 11 tokens
    step = model(torch.stack([ids[1, 11:14], ids[0, 5:8]]), cache=cache, seq_ids=[1, 0])
    assert (step[0] - model(ids[1:, :14])[0, 11:]).abs().max() < 1e-12
    assert (step[1] - model(ids[:1, :8])[0, 5:]).abs().max() < 1e-12


def test_generate_batches_prompts_of_different_lengths_and_equals_uncached_greedy():
    model, tok = linear_model(3), DigitTokenizer()
    prompts = [[1, 2, 3], [4] * 9, [5, 6, 7, 8, 9, 10, 11]]
    results = generate(model, tok, prompts, 8, stop_token_ids=())
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == plain_greedy(model, prompt, 8)


@torch.no_grad()
def test_changing_later_tokens_leaves_earlier_logits_unchanged():
    model, ids = linear_model(4), tokens(4, 2, 16)
    before = model(ids)
    for t in (1, 5, 15):
        changed = ids.clone()
        changed[:, t:] = (changed[:, t:] + 1) % VOCAB
        after = model(changed)
        assert (after[:, :t] - before[:, :t]).abs().max() < 1e-12
        assert (after[:, t:] - before[:, t:]).abs().max() > 1e-6


@torch.no_grad()
def test_state_bytes_are_constant_in_sequence_length():
    model = linear_model(5, feature_map="taylor", v_head_dim=5)
    cache, ids = model.new_cache(1), tokens(5, 1, 40)
    per_seq = 3 * 3 * feature_dim("taylor", 6) * (5 + 1) * 8  # layers·kv_heads·feat·(dv+1)·8
    assert cache.nbytes == per_seq
    model(ids[:, :8], cache=cache)
    for t in range(8, 40):
        model(ids[:, t : t + 1], cache=cache)
        assert cache.nbytes == per_seq
    assert cache.length(0) == 40


@torch.no_grad()
def test_v_head_dim_different_from_the_qk_head_dim_decodes_exactly():
    model, ids = linear_model(6, v_head_dim=5), tokens(6, 2, 9)
    assert model.blocks[0].attn.wo.in_features == 9 * 5
    cache = model.new_cache(2)
    pieces = [model(ids[:, :4], cache=cache), model(ids[:, 4:5], cache=cache)]
    pieces.append(model(ids[:, 5:], cache=cache))
    assert (torch.cat(pieces, dim=1) - model(ids)).abs().max() < 1e-12


@torch.no_grad()
def test_rotary_angles_are_ignored():
    layer = LinearAttention(0, 24, 6, 2, 4).double()
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    angles = torch.rand(7, 2, dtype=torch.float64)
    plain = layer(x, AttentionContext(angles.cos(), angles.sin(), causal(), None, False))
    other = layer(x, AttentionContext((3 * angles).cos(), (3 * angles).sin(), None, None, True))
    assert torch.equal(plain, other)


def test_half_precision_models_keep_the_state_in_float32():
    model = linear_model(7, dtype=torch.bfloat16)
    cache = model.new_cache(1)
    assert cache.S.dtype == cache.z.dtype == torch.float32
    with torch.no_grad():
        logits = model(tokens(7, 1, 5), cache=cache)
    assert logits.dtype == torch.bfloat16 and not logits.isnan().any()


# -- what it cannot do, said clearly -------------------------------------------------------


def test_speculative_decoding_stops_at_the_rollback_it_cannot_do():
    class WrongDrafter:
        """Proposes tokens the model would not pick, so verification must roll back."""

        def propose(self, tokens, k):
            return [VOCAB - 1] * k

    model, tok = linear_model(8), DigitTokenizer()
    with pytest.raises(ValueError, match="a linear-attention state is a running sum"):
        speculative_generate(model, tok, [1, 2, 3], 8, WrongDrafter(), stop_token_ids=())


@torch.no_grad()
def test_other_caches_and_masks_are_refused():
    layer = LinearAttention(0, 24, 6, 2, 4)
    x, angles = torch.randn(1, 3, 24), torch.zeros(3, 2)
    kv = ContiguousCache(1, 2, 4)
    with pytest.raises(TypeError, match="keeps its state in a LinearStateCache, got Contiguous"):
        layer(x, AttentionContext(angles, angles, None, kv, False))
    with pytest.raises(ValueError, match="always causal and cannot apply the mask"):
        layer(x, AttentionContext(angles, angles, sliding_window(2), None, False))


def test_bad_constructor_arguments_name_the_problem():
    with pytest.raises(ValueError, match="feature_map must be one of 'elu', 'relu', 'taylor'"):
        LinearAttention(0, 24, 6, 2, 4, feature_map="cosformer")
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        LinearAttention(0, 24, 6, 4, 4)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        LinearAttention(0, 24, 6, 2, 4, chunk_size=0)
    with pytest.raises(ValueError, match="v_head_dim must be an integer >= 1, got -1"):
        LinearAttention(0, 24, 6, 2, 4, v_head_dim=-1)
