"""Speculative decoding equals greedy decoding, and rollback leaves a clean cache."""

from __future__ import annotations

import math

import pytest
import torch
from test_generate import DigitTokenizer, tiny_model

from attnkit.engine import generate
from attnkit.engine.speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeStats,
    first_layers,
    speculative_generate,
)

PROMPT = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]


class ScriptedDrafter:
    """Proposes from a known continuation: right (the true tokens) or wrong (each one off)."""

    def __init__(self, prompt, truth, wrong=False):
        self.prompt, self.truth, self.wrong = prompt, truth, wrong

    def propose(self, tokens, k):
        done = len(tokens) - len(self.prompt)
        guess = self.truth[done : done + k]
        return [(t + 1) % 27 for t in guess] if self.wrong else guess


def greedy(model, n):
    return generate(model, DigitTokenizer(), PROMPT, n, stop_token_ids=())[0].token_ids


def drafters(model, truth):
    return {
        "lookup": PromptLookupDrafter(),
        "model-1-layer": ModelDrafter(first_layers(model, 1)),
        "always-right": ScriptedDrafter(PROMPT, truth),
        "always-wrong": ScriptedDrafter(PROMPT, truth, wrong=True),
    }


@pytest.mark.parametrize("num_draft", [1, 3, 7])
@pytest.mark.parametrize("kind", ["lookup", "model-1-layer", "always-right", "always-wrong"])
def test_speculative_output_equals_greedy_token_for_token(kind, num_draft):
    model = tiny_model(7)
    truth = greedy(model, 25)
    drafter = drafters(model, truth)[kind]
    result = speculative_generate(
        model, DigitTokenizer(), PROMPT, 25, drafter, num_draft=num_draft, stop_token_ids=()
    )
    assert result.token_ids == truth


@pytest.mark.parametrize("num_draft", [1, 4])
def test_always_right_and_always_wrong_drafts_cost_what_they_should(num_draft):
    model = tiny_model(8)
    truth = greedy(model, 20)
    right, wrong = SpeculativeStats(), SpeculativeStats()
    for drafter, stats in (
        (ScriptedDrafter(PROMPT, truth), right),
        (ScriptedDrafter(PROMPT, truth, wrong=True), wrong),
    ):
        speculative_generate(
            model,
            DigitTokenizer(),
            PROMPT,
            20,
            drafter,
            num_draft=num_draft,
            stop_token_ids=(),
            stats=stats,
        )
    assert right.acceptance_rate == 1.0 and wrong.acceptance_rate == 0.0
    # Prefill gives 1 token; each pass then gives k + 1 (all right) or 1 (all wrong).
    assert right.target_passes == 1 + math.ceil((20 - 1) / (num_draft + 1))
    assert wrong.target_passes == 20


def test_cache_after_rollback_equals_a_cache_that_never_saw_the_rejected_tokens():
    model = tiny_model(9)
    truth = greedy(model, 15)
    caches = []
    make_cache = model.new_cache
    model.new_cache = lambda *a, **k: caches.append(make_cache(*a, **k)) or caches[-1]
    speculative_generate(
        model,
        DigitTokenizer(),
        PROMPT,
        15,
        ScriptedDrafter(PROMPT, truth, wrong=True),
        num_draft=3,
        stop_token_ids=(),
    )
    del model.new_cache
    spec = caches[0]
    clean = model.new_cache(1)
    with torch.no_grad():
        model(torch.tensor([PROMPT + truth[:-1]]), cache=clean)
    n = clean.length(0)
    assert spec.length(0) == n  # the last token is chosen but not yet fed
    for stored, want in ((spec.k, clean.k), (spec.v, clean.v)):
        assert (stored[:, 0, :, :n] - want[:, 0, :, :n]).abs().max() < 1e-12


def test_stop_token_ends_speculative_generation_like_greedy():
    model = tiny_model(10)
    truth = greedy(model, 20)
    stop = truth[6]
    plain = generate(model, DigitTokenizer(), PROMPT, 20, stop_token_ids=(stop,))[0]
    spec = speculative_generate(
        model,
        DigitTokenizer(),
        PROMPT,
        20,
        ScriptedDrafter(PROMPT, truth),
        num_draft=4,
        stop_token_ids=(stop,),
    )
    assert spec.token_ids == plain.token_ids == truth[: truth.index(stop)]
    assert spec.finish_reason == "stop_token"


def test_prompt_lookup_copies_what_followed_the_latest_match():
    drafter = PromptLookupDrafter(max_ngram=2)
    assert drafter.propose([5, 6, 7, 8, 5, 6, 9, 9, 5, 6], 3) == [9, 9, 5]
    assert drafter.propose([1, 2, 3], 2) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: first_layers(m, 0), r"n_layers must be in \[1, 2\], got 0"),
        (lambda m: first_layers(m, 3), r"n_layers must be in \[1, 2\], got 3"),
        (lambda m: PromptLookupDrafter(max_ngram=1, min_ngram=2), "min_ngram <= max_ngram"),
        (
            lambda m: speculative_generate(
                m, DigitTokenizer(), [1], 5, PromptLookupDrafter(), num_draft=0
            ),
            "num_draft must be an integer >= 1, got 0",
        ),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_model())


def test_first_layers_at_the_limit_is_the_whole_model():
    model = tiny_model(11)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(first_layers(model, 2)(ids), model(ids))


def test_real_model_speculative_equals_greedy(smollm2):
    model, tokenizer = smollm2
    prompt = "List the numbers from one to twelve in words, separated by commas:"
    plain = generate(model, tokenizer, prompt, 40)[0]
    stats = SpeculativeStats()
    spec = speculative_generate(model, tokenizer, prompt, 40, PromptLookupDrafter(), stats=stats)
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert stats.target_passes <= stats.generated  # never more passes than plain decoding
