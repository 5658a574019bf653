"""generate(): greedy equals uncached decoding, batches equal prompts alone, stops, streams."""

from __future__ import annotations

import pytest
import torch

from attnkit.engine import GenerationStats, generate
from attnkit.models.llama import LlamaConfig, Transformer


class DigitTokenizer:
    """Token i is the character chr(65 + i % 26); enough of a tokenizer for tiny models."""

    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [(ord(c) - 65) % 26 + 1 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 26) for i in ids if not (skip_special_tokens and i == 0))


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=27,
        hidden_size=36,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        **overrides,
    )
    return Transformer(config).double().eval()


@torch.no_grad()
def plain_greedy(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    """Greedy decoding recomputing the whole sequence each step (no cache at all)."""
    ids, out = list(prompt), []
    for _ in range(n):
        token = int(model(torch.tensor([ids]))[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
    return out


def test_greedy_generate_equals_uncached_greedy_decoding():
    model, tok = tiny_model(), DigitTokenizer()
    prompt = [3, 5, 7, 9, 11]
    result = generate(model, tok, prompt, 12, stop_token_ids=())
    assert result[0].token_ids == plain_greedy(model, prompt, 12)
    assert result[0].finish_reason == "length" and len(result[0].token_ids) == 12


def test_a_batch_of_different_lengths_equals_each_prompt_alone():
    model, tok = tiny_model(1), DigitTokenizer()
    prompts = [[1, 2, 3], [4] * 9, [5, 6, 7, 8, 9, 10, 11]]
    together = generate(model, tok, prompts, 8, stop_token_ids=())
    for prompt, result in zip(prompts, together, strict=True):
        assert result.token_ids == generate(model, tok, prompt, 8, stop_token_ids=())[0].token_ids
        assert result.prompt_ids == prompt


def test_stop_token_ends_one_prompt_and_the_others_continue():
    model, tok = tiny_model(2), DigitTokenizer()
    prompts = [[1, 2, 3], [7, 8]]
    free = generate(model, tok, prompts, 10, stop_token_ids=())
    stopper = free[0].token_ids[3]  # make the 4th token of prompt 0 a stop token
    results = generate(model, tok, prompts, 10, stop_token_ids=(stopper,))
    assert results[0].token_ids == free[0].token_ids[:3]
    assert results[0].finish_reason == "stop_token"
    cut = free[1].token_ids.index(stopper) if stopper in free[1].token_ids else 10
    assert results[1].token_ids == free[1].token_ids[:cut]


def test_stop_string_cuts_the_text_before_it():
    model, tok = tiny_model(3), DigitTokenizer()
    free = generate(model, tok, [1, 2], 10, stop_token_ids=())[0]
    stop = free.text[4:6]
    result = generate(model, tok, [1, 2], 10, stop=[stop], stop_token_ids=())[0]
    assert result.text == free.text[: free.text.find(stop)]
    assert result.finish_reason == "stop_string"


def test_stream_receives_every_piece_of_text_in_order():
    model, tok = tiny_model(4), DigitTokenizer()
    pieces = []
    result = generate(
        model,
        tok,
        [[1, 2], [3]],
        6,
        stop_token_ids=(),
        stream=lambda i, t, s: pieces.append((i, s)),
    )
    for index in (0, 1):
        assert "".join(s for i, s in pieces if i == index) == result[index].text


def test_sampling_with_a_seed_is_reproducible_and_differs_from_greedy():
    model, tok = tiny_model(5), DigitTokenizer()
    a = generate(model, tok, [1, 2, 3], 20, temperature=1.5, seed=11, stop_token_ids=())
    b = generate(model, tok, [1, 2, 3], 20, temperature=1.5, seed=11, stop_token_ids=())
    greedy = generate(model, tok, [1, 2, 3], 20, stop_token_ids=())
    assert a[0].token_ids == b[0].token_ids != greedy[0].token_ids


def test_stats_count_prefill_and_decode_tokens():
    model, tok = tiny_model(6), DigitTokenizer()
    stats = GenerationStats()
    generate(model, tok, [[1, 2, 3], [4, 5]], 4, stop_token_ids=(), stats=stats)
    assert stats.prefill_tokens == 5 and stats.decode_tokens == 8
    assert stats.prefill_seconds > 0 and stats.decode_tokens_per_second > 0


@pytest.mark.parametrize(
    ("prompts", "kwargs", "message"),
    [
        ([1, 2], {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ([], {}, "prompts must hold at least one prompt"),
        ("", {}, "the prompt is empty"),
        ([[1], []], {}, "at least one token"),
        ([1], {"temperature": -1.0}, "temperature must be"),
    ],
)
def test_bad_arguments(prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_model(), DigitTokenizer(), prompts, **({"max_new_tokens": 3} | kwargs))


def test_chat_prompt_on_the_real_model_answers(smollm2):
    model, tokenizer = smollm2
    result = generate(model, tokenizer, "What is the capital of France?", 20, chat=True)[0]
    assert "Paris" in result.text and result.finish_reason == "stop_token"
