"""Passkey retrieval: prompt construction, exact-match scoring, and SmolLM2 with and without
a window that hides the key."""

from __future__ import annotations

import math

import pytest

from attnkit.cache.window import SlidingWindowCache
from attnkit.tools.passkey import (
    FILLER,
    is_correct,
    make_passkey_prompt,
    min_passkey_length,
    passkey_accuracy,
    passkey_for,
)


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


def window_factory(model, window: int, sinks: int):
    """A SlidingWindowCache for `model` holding one empty sequence."""
    cfg = model.config

    def factory():
        cache = SlidingWindowCache(
            cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, window=window, sinks=sinks
        )
        cache.add_sequence()
        return cache

    return factory


# -- prompt construction ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 7, 97, 256, 1025])  # added to the minimum
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_prompt_has_exactly_the_target_length(tokenizer, length, depth):
    target = min_passkey_length(tokenizer) + length
    prompt = make_passkey_prompt(tokenizer, target, depth, 12345)
    assert prompt.length == len(prompt.token_ids) == target
    assert prompt.filler_end - prompt.filler_start == target - (
        prompt.filler_start + prompt.length - prompt.filler_end
    )


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_key_line_sits_at_the_requested_depth(tokenizer, depth):
    prompt = make_passkey_prompt(tokenizer, 700, depth, 42424)
    key_line = tokenizer.decode(list(prompt.token_ids[prompt.key_start : prompt.key_end]))
    assert key_line.count("42424") == 2 and "pass key" in key_line
    # Nothing else in the prompt holds the key.
    rest = prompt.token_ids[: prompt.key_start] + prompt.token_ids[prompt.key_end :]
    assert "42424" not in tokenizer.decode(list(rest))
    # The key line goes in at a sentence boundary: off by at most half the longest sentence.
    filler = (prompt.filler_end - prompt.filler_start) - (prompt.key_end - prompt.key_start)
    longest = max(len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in FILLER)
    assert abs(prompt.key_start - prompt.filler_start - depth * filler) <= longest / 2
    assert abs(prompt.placed_depth - depth) <= longest / (2 * filler)


def test_prompt_is_plain_text_that_tokenizes_back_to_itself(tokenizer):
    prompt = make_passkey_prompt(tokenizer, 300, 0.4, 98765)
    text = tokenizer.decode(list(prompt.token_ids))
    assert text.startswith("There is an important info hidden")
    assert text.endswith("What is the pass key? The pass key is ")
    assert "The grass is green. The sky is blue." in text
    assert tokenizer(text)["input_ids"] == list(prompt.token_ids)
    # The answer tokens continue the prompt into "... The pass key is 98765".
    full = tokenizer.decode(list(prompt.token_ids + prompt.answer_ids))
    assert full.endswith("The pass key is 98765")
    assert tokenizer.decode(list(prompt.answer_ids)).strip() == "98765"


def test_prompt_at_the_minimum_length_has_no_filler_and_one_less_raises(tokenizer):
    minimum = min_passkey_length(tokenizer)
    prompt = make_passkey_prompt(tokenizer, minimum, 0.5, 99999)
    assert prompt.key_start == prompt.filler_start and prompt.key_end == prompt.filler_end
    assert prompt.placed_depth == 0.0
    with pytest.raises(ValueError, match=rf"length_tokens must be an integer >= {minimum}"):
        make_passkey_prompt(tokenizer, minimum - 1, 0.5, 99999)


def test_seeded_keys_are_reproducible_five_digit_and_differ_across_seeds():
    keys = [passkey_for(0, 1024, 0.5, t) for t in range(20)]
    assert keys == [passkey_for(0, 1024, 0.5, t) for t in range(20)]
    assert all(10_000 <= k <= 99_999 for k in keys)
    assert len(set(keys)) > 15  # trials draw different keys
    assert [passkey_for(1, 1024, 0.5, t) for t in range(20)] != keys
    assert [passkey_for(0, 1024, 0.25, t) for t in range(20)] != keys


# -- scoring ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("continuation", "expected"),
    [
        ("12345", True),
        ("12345. Remember it.", True),
        (" 12345 is the pass key", True),
        ("the key: 12345\n", True),
        ("123456", False),  # an extra digit
        ("012345", False),
        ("1234", False),
        ("1234 5", False),
        ("54321", False),
        ("", False),
        ("a magical number", False),
    ],
)
def test_scoring_is_exact_match_on_the_number(continuation, expected):
    assert is_correct(continuation, 12345) is expected


# -- SmolLM2 ---------------------------------------------------------------------------------


def test_full_attention_retrieves_the_key_at_short_lengths(smollm2):
    model, tokenizer = smollm2
    result = passkey_accuracy(
        model, tokenizer, lengths=[256, 512], depths=[0.0, 0.5, 1.0], trials=1, seed=0
    )
    # Measured: 100% (40 of 40 trials at 256 and 1024 tokens, depths 0..1; see the README).
    # One miss in six is allowed for headroom; two mean retrieval broke.
    assert result.overall >= 5 / 6, result.details
    assert len(result.details) == 6 and set(result.accuracy) == {
        (n, d) for n in (256, 512) for d in (0.0, 0.5, 1.0)
    }
    assert math.isclose(result.overall, sum(r.correct for r in result.details) / 6)
    assert result.grid() == [[result.accuracy[(n, d)] for d in result.depths] for n in (256, 512)]


def test_a_window_that_excludes_the_key_cannot_retrieve_it(smollm2):
    model, tokenizer = smollm2
    common = dict(lengths=[512], trials=2, seed=3)
    window = window_factory(model, window=128, sinks=4)
    full = passkey_accuracy(model, tokenizer, depths=[0.0], **common)
    far = passkey_accuracy(model, tokenizer, depths=[0.0], cache_factory=window, **common)
    near = passkey_accuracy(model, tokenizer, depths=[1.0], cache_factory=window, **common)
    assert all(r.key_position > 4 and 512 - r.key_position > 128 for r in far.details)
    assert full.overall == 1.0, full.details  # full attention finds the far key
    assert far.overall == 0.0, far.details  # the window has dropped it
    assert near.overall == 1.0, near.details  # the same cache finds a key inside the window


def test_progress_reports_every_trial(smollm2):
    model, tokenizer = smollm2
    calls = []
    minimum = min_passkey_length(tokenizer)
    passkey_accuracy(
        model,
        tokenizer,
        lengths=[minimum],
        depths=[0.0, 1.0],
        trials=2,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [-0.01, 1.01, math.nan, math.inf])
def test_depth_outside_unit_interval_raises(tokenizer, depth):
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        make_passkey_prompt(tokenizer, 300, depth, 12345)


def test_depth_that_is_not_a_number_raises(tokenizer):
    with pytest.raises(TypeError, match="depth must be a number in \\[0, 1\\], got str"):
        make_passkey_prompt(tokenizer, 300, "0.5", 12345)


@pytest.mark.parametrize("length", [10, 300.0, True])
def test_bad_length_raises(tokenizer, length):
    with pytest.raises(ValueError, match="length_tokens must be an integer >= "):
        make_passkey_prompt(tokenizer, length, 0.5, 12345)


@pytest.mark.parametrize("passkey", [-1, 1.5, "12345"])
def test_bad_passkey_raises(tokenizer, passkey):
    with pytest.raises(ValueError, match="passkey must be an integer >= 0"):
        make_passkey_prompt(tokenizer, 300, 0.5, passkey)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(trials=0), ValueError, "trials must be an integer >= 1, got 0"),
        (dict(trials=-2), ValueError, "trials must be an integer >= 1, got -2"),
        (dict(lengths=[]), ValueError, "lengths must be a non-empty sequence"),
        (dict(lengths=[300, 300]), ValueError, "lengths must not repeat"),
        (dict(lengths=[20]), ValueError, "length_tokens must be an integer >= "),
        (dict(depths=[0.5, 2.0]), ValueError, r"depth must be in \[0, 1\] .*got 2.0"),
        (dict(max_new_tokens=4), ValueError, "max_new_tokens must be >= 5"),
        (dict(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
        (dict(seed=1.5), TypeError, "seed must be an integer, got float"),
        (dict(cache_factory=3), TypeError, "cache_factory must be callable, got int"),
    ],
)
def test_bad_accuracy_arguments_raise_before_running(smollm2, kwargs, error, message):
    model, tokenizer = smollm2
    args = dict(lengths=[300], depths=[0.5], trials=1) | kwargs
    with pytest.raises(error, match=message):
        passkey_accuracy(model, tokenizer, **args)


def test_cache_factory_must_give_one_empty_sequence(smollm2):
    model, tokenizer = smollm2
    args = dict(lengths=[min_passkey_length(tokenizer)], depths=[0.5], trials=1)
    with pytest.raises(ValueError, match="one empty sequence"):
        passkey_accuracy(model, tokenizer, cache_factory=lambda: model.new_cache(2), **args)
    with pytest.raises(TypeError, match="cache_factory must return a KVCache, got dict"):
        passkey_accuracy(model, tokenizer, cache_factory=dict, **args)
