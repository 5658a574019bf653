"""Passkey retrieval: can the model find a number hidden in a long, repetitive haystack?

The test of Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length
for Transformers" (2023), as YaRN and LongLoRA use it: a random 5-digit key sits at a relative
depth inside filler ("The grass is green. The sky is blue. ..." repeated) of a target length,
and the prompt ends by asking for it. The model's greedy continuation must hold exactly the
key. Run through a cache (`cache_factory`), it shows what a KV strategy forgets: a window or
an eviction policy that drops the key's tokens cannot answer.

The prompt ends where the key's digits begin in the tokenizer's own spelling of the answer.
SmolLM2 writes " 12345" as " " followed by one token per digit, so its prompts end with the
" " token; ending at "is" instead makes the model choose between " " and words such as " a",
and it often picks a word although it would copy the digits correctly after " ".
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from attnkit._checks import check_positive_int
from attnkit.cache.base import KVCache
from attnkit.tools.perplexity import fresh_cache

Progress = Callable[[int, int], None]  # (trials done, trials in total)

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there."
)
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
KEY_LINE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is "


@dataclass(frozen=True)
class PasskeyPrompt:
    """A haystack prompt: its token ids, where the key line and filler sit, and the answer.

    Token layout: `[0, filler_start)` the instructions, `[filler_start, key_start)` filler,
    `[key_start, key_end)` the key line, `[key_end, filler_end)` filler, then the question.
    `answer_ids` are the tokens a correct greedy continuation starts with.
    """

    token_ids: tuple[int, ...]
    passkey: int
    answer_ids: tuple[int, ...]
    depth: float  # as requested
    filler_start: int
    key_start: int
    key_end: int
    filler_end: int

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def placed_depth(self) -> float:
        """Fraction of the filler tokens that come before the key line (0 when none exist)."""
        filler = (self.filler_end - self.filler_start) - (self.key_end - self.key_start)
        return (self.key_start - self.filler_start) / filler if filler else 0.0


@dataclass(frozen=True)
class PasskeyTrial:
    """One prompt's outcome: the continuation the model wrote and whether it held the key."""

    length: int
    depth: float
    trial: int
    passkey: int
    key_position: int  # index of the key line's first token in the prompt
    continuation: str
    correct: bool


@dataclass(frozen=True)
class PasskeyResult:
    """Exact-match accuracy per (length, depth) cell, overall, and every trial."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    trials: int
    seed: int
    accuracy: dict[tuple[int, float], float]
    overall: float
    details: tuple[PasskeyTrial, ...]
    seconds: float

    def grid(self) -> list[list[float]]:
        """Accuracy rows per length, columns per depth (in the order asked)."""
        return [[self.accuracy[(n, d)] for d in self.depths] for n in self.lengths]

    def as_dict(self) -> dict:
        """JSON-ready: the grid, the overall accuracy and each trial."""
        return {
            "lengths": list(self.lengths),
            "depths": list(self.depths),
            "trials": self.trials,
            "seed": self.seed,
            "accuracy": self.grid(),
            "overall": self.overall,
            "seconds": self.seconds,
            "details": [vars(t) for t in self.details],
        }


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _check_depth(depth: object) -> float:
    if isinstance(depth, bool) or not isinstance(depth, int | float):
        raise TypeError(f"depth must be a number in [0, 1], got {type(depth).__name__}")
    if not (math.isfinite(depth) and 0.0 <= depth <= 1.0):
        raise ValueError(
            f"depth must be in [0, 1] (0: key right after the instructions, 1: right "
            f"before the question), got {depth!r}"
        )
    return float(depth)


def _check_passkey(passkey: object) -> int:
    if isinstance(passkey, bool) or not isinstance(passkey, int) or passkey < 0:
        raise ValueError(f"passkey must be an integer >= 0, got {passkey!r}")
    return passkey


def _question(tokenizer, key: str) -> tuple[list[int], list[int]]:
    """The question's tokens up to where the key's digits begin, and the answer's tokens."""
    full = _encode(tokenizer, QUESTION + key)
    cut = 0
    while cut < len(full) and QUESTION.startswith(tokenizer.decode(full[: cut + 1])):
        cut += 1
    return full[:cut], full[cut:]


def passkey_for(seed: int, length: int, depth: float, trial: int) -> int:
    """The 5-digit key of one trial: fixed by (seed, length, depth, trial), else independent."""
    return random.Random(f"passkey/{seed}/{length}/{depth!r}/{trial}").randrange(10_000, 100_000)


def min_passkey_length(tokenizer, passkey: int = 99_999) -> int:
    """Tokens of a prompt with no filler at all: the shortest `length_tokens` allowed."""
    key = str(_check_passkey(passkey))
    intro = _encode(tokenizer, INTRO, special=True)
    question, _ = _question(tokenizer, key)
    return len(intro) + len(_encode(tokenizer, KEY_LINE.format(key=key))) + len(question)


def make_passkey_prompt(tokenizer, length_tokens: int, depth: float, passkey: int) -> PasskeyPrompt:
    """A prompt of exactly `length_tokens` tokens hiding `passkey` at relative `depth`.

    The filler is the five sentences cycled, cut to fill the length exactly; the key line goes
    in at the sentence boundary nearest to `depth` of the filler (so the placed depth is off by
    at most half a sentence, see `PasskeyPrompt.placed_depth`).
    """
    depth = _check_depth(depth)
    key = str(_check_passkey(passkey))
    intro = _encode(tokenizer, INTRO, special=True)
    key_line = _encode(tokenizer, KEY_LINE.format(key=key))
    question, answer = _question(tokenizer, key)
    minimum = len(intro) + len(key_line) + len(question)
    if (
        isinstance(length_tokens, bool)
        or not isinstance(length_tokens, int)
        or (length_tokens < minimum)
    ):
        raise ValueError(
            f"length_tokens must be an integer >= {minimum} (instructions, key line and "
            f"question without any filler), got {length_tokens!r}"
        )
    budget = length_tokens - minimum
    sentences = [_encode(tokenizer, " " + s) for s in FILLER]
    filler, bounds = [], [0]
    while len(filler) < budget:
        filler += sentences[(len(bounds) - 1) % len(sentences)]
        bounds.append(len(filler))
    filler = filler[:budget]
    bounds = [b for b in bounds if b < budget] + [budget]
    split = min(bounds, key=lambda b: abs(b - depth * budget))
    ids = intro + filler[:split] + key_line + filler[split:] + question
    key_start = len(intro) + split
    return PasskeyPrompt(
        token_ids=tuple(ids),
        passkey=int(key),
        answer_ids=tuple(answer),
        depth=depth,
        filler_start=len(intro),
        key_start=key_start,
        key_end=key_start + len(key_line),
        filler_end=len(intro) + budget + len(key_line),
    )


def is_correct(continuation: str, passkey: int) -> bool:
    """Exact match: the first run of digits in `continuation` is the key, no more, no less."""
    found = re.search(r"\d+", continuation)
    return found is not None and found.group() == str(passkey)


@torch.no_grad()
def greedy_continuation(
    model: nn.Module,
    tokenizer,
    prompt_ids: Sequence[int],
    cache: KVCache,
    *,
    max_new_tokens: int,
    chunk_size: int,
) -> str:
    """Prefill `prompt_ids` through `cache` in chunks, then decode greedily through it.

    Stops early at EOS or once a run of digits has ended (nothing after it changes the score).
    """
    limit = getattr(cache, "max_step_tokens", None) or getattr(cache, "max_new_per_step", None)
    chunk = min(chunk_size, limit) if limit else chunk_size
    seq = cache.sequences[0]
    device = next(model.parameters()).device
    ids = torch.tensor(list(prompt_ids), device=device).unsqueeze(0)
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start : start + chunk], cache=cache, seq_ids=[seq])
    eos = getattr(tokenizer, "eos_token_id", None)
    new: list[int] = []
    text = ""
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if re.search(r"\d\D", text):
            break
        logits = model(torch.tensor([[token]], device=device), cache=cache, seq_ids=[seq])
    return text


def passkey_accuracy(
    model: nn.Module,
    tokenizer,
    *,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int = 0,
    cache_factory: Callable[[], KVCache] | None = None,
    max_new_tokens: int = 8,
    chunk_size: int = 512,
    progress: Progress | None = None,
) -> PasskeyResult:
    """Exact-match passkey accuracy for every (length, depth) cell over `trials` keys each.

    Each prompt is prefilled through a fresh `cache_factory()` (default `model.new_cache(1)`:
    full attention) `chunk_size` tokens at a time (fewer if the cache caps a step's tokens),
    then decoded greedily through it for up to `max_new_tokens` tokens. Keys come from
    `passkey_for(seed, length, depth, trial)`. `progress(done, total)` follows each trial.
    """
    lengths = _check_sequence("lengths", lengths)
    depths = tuple(_check_depth(d) for d in _check_sequence("depths", depths))
    check_positive_int("trials", trials)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("chunk_size", chunk_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {type(seed).__name__}")
    if cache_factory is not None and not callable(cache_factory):
        raise TypeError(f"cache_factory must be callable, got {type(cache_factory).__name__}")
    # Build every prompt first: a bad length fails now, not an hour into the run.
    cells = [(n, d) for n in lengths for d in depths]
    prompts = {
        (n, d, t): make_passkey_prompt(tokenizer, n, d, passkey_for(seed, n, d, t))
        for n, d in cells
        for t in range(trials)
    }
    longest = max(len(p.answer_ids) for p in prompts.values())
    if max_new_tokens < longest:
        raise ValueError(
            f"max_new_tokens must be >= {longest}, the tokens of a key's answer, "
            f"got {max_new_tokens}"
        )
    start, details = time.perf_counter(), []
    for (n, d, t), prompt in prompts.items():
        cache = fresh_cache(model, cache_factory)
        text = greedy_continuation(
            model,
            tokenizer,
            prompt.token_ids,
            cache,
            max_new_tokens=max_new_tokens,
            chunk_size=chunk_size,
        )
        details.append(
            PasskeyTrial(
                n, d, t, prompt.passkey, prompt.key_start, text, is_correct(text, prompt.passkey)
            )
        )
        if progress is not None:
            progress(len(details), len(prompts))
    accuracy = {
        (n, d): sum(r.correct for r in details if (r.length, r.depth) == (n, d)) / trials
        for n, d in cells
    }
    return PasskeyResult(
        lengths=lengths,
        depths=depths,
        trials=trials,
        seed=seed,
        accuracy=accuracy,
        overall=sum(r.correct for r in details) / len(details),
        details=tuple(details),
        seconds=time.perf_counter() - start,
    )


def _check_sequence(name: str, values: object) -> tuple:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty sequence, got {values!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value, got {list(values)}")
    return tuple(values)
