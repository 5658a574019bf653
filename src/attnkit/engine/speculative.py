"""Speculative decoding: a cheap drafter proposes tokens, the model verifies them in one pass.

Leviathan et al. 2023 / Chen et al. 2023, greedy variant: the model runs once over the last
accepted token plus k drafted ones; the drafted tokens it would itself have chosen are kept,
plus its own next token, and the cache is truncated to what was kept. Output equals plain
greedy decoding token for token; what changes is how many forward passes it takes.

Drafters: prompt lookup (Saxena 2023: copy what followed the latest earlier occurrence of
the last n-gram — free, strong on repetitive text) and a smaller draft model (for example
the first layers of the same model, `first_layers(model, n)`), which keeps its own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from attnkit._checks import check_positive_int
from attnkit.engine.generate import GenerationResult, encode_prompt
from attnkit.models.llama import Block, Transformer
from attnkit.models.stacked_decode import StackedDecode


class Drafter(Protocol):
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` guesses for the tokens that follow `tokens` (may be fewer, or none)."""
        ...


class PromptLookupDrafter:
    """Copy the continuation of the most recent earlier match of the last n-gram."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                f"max_ngram={max_ngram}"
            )
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # most recent match first
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + k]
        return []


class ModelDrafter:
    """Greedy proposals from a (smaller) model with its own cache, kept in step with the text."""

    def __init__(self, draft_model: nn.Module) -> None:
        self.model = draft_model
        self.cache = draft_model.new_cache(1)
        self.seq = self.cache.sequences[0]

    @torch.no_grad()
    def propose(self, tokens: list[int], k: int) -> list[int]:
        device = next(self.model.parameters()).device
        known = self.cache.length(self.seq)
        if known >= len(tokens):  # text was rolled back further than the cache: resync
            self.cache.truncate(self.seq, len(tokens) - 1)
            known = len(tokens) - 1
        logits = self.model(torch.tensor([tokens[known:]], device=device), cache=self.cache)
        draft: list[int] = []
        for i in range(k):
            draft.append(int(logits[0, -1].argmax()))
            if i < k - 1:
                logits = self.model(torch.tensor([[draft[-1]]], device=device), cache=self.cache)
        self.cache.truncate(self.seq, len(tokens))  # forget the guesses; keep the real text
        return draft


def first_layers(model: Transformer, n_layers: int) -> Transformer:
    """A draft model made of the first `n_layers` blocks of `model` (weights shared, not copied)."""
    total = len(model.blocks)
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers must be in [1, {total}], got {n_layers}")
    draft = Transformer.__new__(Transformer)
    nn.Module.__init__(draft)
    draft.config = model.config
    draft.embed, draft.norm, draft.lm_head, draft.rope = (
        model.embed,
        model.norm,
        model.lm_head,
        model.rope,
    )
    draft.blocks = nn.ModuleList(list(model.blocks)[:n_layers])
    draft._stacked_decode = StackedDecode(Block)
    return draft


@dataclass
class SpeculativeStats:
    """How well the drafter did: proposals accepted, and model passes per token."""

    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.generated / self.target_passes if self.target_passes else 0.0


@torch.no_grad()
def speculative_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    drafter: Drafter,
    *,
    num_draft: int = 4,
    stop_token_ids: Sequence[int] | None = None,
    chat: bool = False,
    stats: SpeculativeStats | None = None,
) -> GenerationResult:
    """Greedy generation for one prompt, verified in chunks of `num_draft` drafted tokens."""
    check_positive_int("num_draft", num_draft)
    check_positive_int("max_new_tokens", max_new_tokens)
    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        stop_token_ids = () if eos is None else (eos,)
    stops = set(stop_token_ids)
    stats = stats if stats is not None else SpeculativeStats()
    result = GenerationResult(encode_prompt(tokenizer, prompt, chat))
    device = next(model.parameters()).device
    cache = model.new_cache(1)
    seq = cache.sequences[0]

    logits = model(torch.tensor([result.prompt_ids], device=device), cache=cache)
    stats.target_passes += 1
    pending = [int(logits[0, -1].argmax())]  # chosen by the model, not yet in its cache
    while not _take(pending, result, stops, max_new_tokens, stats):
        last = result.token_ids[-1]
        k = min(num_draft, max_new_tokens - len(result.token_ids))
        draft = drafter.propose(result.prompt_ids + result.token_ids, k)[:k]
        kept_before = cache.length(seq)
        logits = model(torch.tensor([[last, *draft]], device=device), cache=cache)
        stats.target_passes += 1
        choices = logits[0].argmax(-1).tolist()  # choices[i]: the model's token after feed[:i+1]
        accepted = 0
        while accepted < len(draft) and draft[accepted] == choices[accepted]:
            accepted += 1
        stats.proposed += len(draft)
        stats.accepted += accepted
        cache.truncate(seq, kept_before + 1 + accepted)  # `last` and the accepted drafts
        pending = [*draft[:accepted], choices[accepted]]
    result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    return result


def _take(tokens: list[int], result: GenerationResult, stops, limit: int, stats) -> bool:
    """Append verified tokens; True when generation is finished (stop token or length)."""
    for token in tokens:
        if token in stops:
            result.finish_reason = "stop_token"
            return True
        result.token_ids.append(token)
        stats.generated += 1
        if len(result.token_ids) == limit:
            return True
    return False
