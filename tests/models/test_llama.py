"""The Llama decoder on tiny random configs: cache decoding equals one full forward."""

from __future__ import annotations

import pytest
import torch

from attn_testing import assert_ragged_batch_decodes_as_alone, tiny_transformer
from attnkit.models.llama import LlamaConfig, Transformer


def tiny(seed: int = 0, **overrides) -> Transformer:
    return tiny_transformer(seed, **overrides)


@pytest.mark.parametrize("chunks", [[10, 4, 6], [1] * 20, [19, 1], [20]], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@torch.no_grad()
def test_decoding_through_the_cache_equals_one_full_forward(chunks, interleaved):
    model = tiny(rope_interleaved=interleaved)
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache, pieces, start = model.new_cache(2, initial_len=8), [], 0  # forces growth too
    for n in chunks:
        pieces.append(model(ids[:, start : start + n], cache=cache))
        start += n
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-12
    assert cache.length(0) == cache.length(1) == 20


@torch.no_grad()
def test_last_prefill_row_equals_first_decode_row():
    model = tiny()
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(2))
    prefill = model(ids)
    cache = model.new_cache(1)
    model(ids[:, :11], cache=cache)
    decoded = model(ids[:, 11:], cache=cache)
    assert (prefill[:, -1] - decoded[:, 0]).abs().max() < 1e-12


@torch.no_grad()
def test_ragged_batch_decodes_each_sequence_as_if_alone():
    model = tiny()
    assert_ragged_batch_decodes_as_alone(model)  # float64 model: 1e-12


@torch.no_grad()
def test_future_tokens_do_not_change_earlier_logits():
    model = tiny()
    ids = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 101
    assert torch.equal(model(ids)[:, :9], model(changed)[:, :9])
    assert not torch.equal(model(ids)[:, 9:], model(changed)[:, 9:])


def test_tied_embeddings_share_one_tensor():
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed.weight


def test_bad_input_ids_shape():
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\), got shape \(5,\)"):
        tiny()(torch.zeros(5, dtype=torch.long))


def test_seq_ids_must_match_the_batch():
    model = tiny()
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="input_ids has batch 1 but seq_ids names 2 sequences"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_key_value_heads", 4, "must be a multiple of num_key_value_heads"),
        ("hidden_size", 0, "hidden_size must be an integer >= 1"),
        ("rms_norm_eps", 0.0, "rms_norm_eps must be > 0"),
        ("hidden_size", 50, "not divisible by num_attention_heads"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    config = dict(
        vocab_size=10,
        hidden_size=54,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**(config | {field: value}))
