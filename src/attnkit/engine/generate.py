"""`generate()`: prompts in, one result per prompt out (static batch through a KV cache)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from attnkit._checks import check_positive_int
from attnkit.engine.sampling import SamplingParams, next_tokens

StreamCallback = Callable[[int, int, str], None]  # (prompt index, token id, new text)


@dataclass
class GenerationResult:
    """One prompt's outcome: the new tokens (not the prompt), their text, and why it ended."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"  # "length", "stop_token" or "stop_string"


@dataclass
class GenerationStats:
    """Wall time and token counts of one `generate` call, for tokens/s."""

    prefill_seconds: float = 0.0
    prefill_tokens: int = 0
    decode_seconds: float = 0.0
    decode_tokens: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


def encode_prompt(tokenizer, prompt: str | Sequence[int], chat: bool) -> list[int]:
    """Token ids for a prompt: strings as given, or wrapped in the chat template if `chat`."""
    if not isinstance(prompt, str):
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("a prompt of token ids must hold at least one token")
        return ids
    if chat:
        messages = [{"role": "user", "content": prompt}]
        return list(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty: give at least one token of text")
    return list(ids)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_token_ids: Sequence[int] | None = None,
    chat: bool = False,
    stream: StreamCallback | None = None,
    stats: GenerationStats | None = None,
) -> list[GenerationResult]:
    """Generate up to `max_new_tokens` for each prompt; greedy unless `temperature > 0`.

    `prompts` is one prompt or a list: strings (tokenized as they are, or through the chat
    template with `chat=True`) or lists of token ids. Generation of a prompt stops at
    `max_new_tokens`, at a token in `stop_token_ids` (default: the tokenizer's EOS), or
    when its text contains a string of `stop` (the text is cut before it). Each prompt is
    prefilled on its own, then all unfinished ones decode together.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    params = SamplingParams(temperature, top_k, top_p, seed)
    single = isinstance(prompts, str) or (
        len(prompts) > 0 and all(isinstance(t, int) for t in prompts)
    )
    prompt_list = [prompts] if single else list(prompts)
    if not prompt_list:
        raise ValueError("prompts must hold at least one prompt, got none")
    if stop_token_ids is None:
        eos = getattr(tokenizer, "eos_token_id", None)
        stop_token_ids = () if eos is None else (eos,)
    stops, stop_ids = tuple(stop), set(stop_token_ids)
    stats = stats if stats is not None else GenerationStats()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    results = [GenerationResult(encode_prompt(tokenizer, p, chat)) for p in prompt_list]
    device = next(model.parameters()).device
    cache = model.new_cache(0, max_seqs=len(results))
    seqs = [cache.add_sequence() for _ in results]

    start = time.perf_counter()
    last_logits = []
    for seq, result in zip(seqs, results, strict=True):
        ids = torch.tensor([result.prompt_ids], device=device)
        last_logits.append(model(ids, cache=cache, seq_ids=[seq], last_only=True)[:, -1])
        stats.prefill_tokens += len(result.prompt_ids)
    logits = torch.cat(last_logits)
    stats.prefill_seconds += time.perf_counter() - start

    active = list(range(len(results)))
    start = time.perf_counter()
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, params, generator).tolist()
        still = []
        for row, index in enumerate(active):
            if _append(results[index], tokens[row], tokenizer, stop_ids, stops, stream, index):
                still.append((row, index))
        stats.decode_tokens += len(active)
        if not still or step == max_new_tokens - 1:
            break
        active = [index for _, index in still]
        feed = torch.tensor([[tokens[row]] for row, _ in still], device=device)
        logits = model(feed, cache=cache, seq_ids=[seqs[i] for i in active])[:, -1]
    stats.decode_seconds += time.perf_counter() - start
    return results


def _append(result, token, tokenizer, stop_ids, stops, stream, index) -> bool:
    """Record one new token; False when the prompt is finished."""
    if token in stop_ids:
        result.finish_reason = "stop_token"
        return False
    before = result.text
    result.token_ids.append(token)
    result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    hit = min((result.text.find(s) for s in stops if s in result.text), default=-1)
    if hit >= 0:
        result.text = result.text[:hit]
        result.finish_reason = "stop_string"
    if stream is not None and result.text.startswith(before) and len(result.text) > len(before):
        stream(index, token, result.text[len(before) :])
    return hit < 0
