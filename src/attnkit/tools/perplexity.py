"""Perplexity of a causal language model on a token stream: sliding windows or a KV cache.

Two ways to give every token a context:

- Sliding windows (as in Hugging Face's "Perplexity of fixed-length models" guide): windows
  of `context` input tokens start every `stride` tokens; each scores only the targets no
  earlier window scored, so every target after the first token is scored exactly once and,
  past the first window, sees between `context - stride + 1` and `context` tokens.
- Streaming through a cache: the tokens go through one sequence of a fresh cache in chunks
  and every next token is scored. The cache decides what each token sees (a window, sinks,
  heavy hitters, quantized K/V), so this measures a KV strategy's quality and gives the
  per-position NLL behind a "perplexity vs position" plot.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit._checks import check_positive_int
from attnkit.cache.base import KVCache

Progress = Callable[[int, int], None]  # (targets scored so far, targets in total)


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean NLL) over `n_tokens` scored targets, with each target's NLL and position.

    `nll[i]` is -log p(token_ids[positions[i]] | what the model saw before it), in float64,
    in position order. `context`/`stride` are None when a cache decided the context.
    """

    perplexity: float
    mean_nll: float
    n_tokens: int
    context: int | None
    stride: int | None
    nll: Tensor  # (n_tokens,) float64
    positions: Tensor  # (n_tokens,) int64, indices into token_ids (1 .. len - 1)
    mode: str  # "sliding" or "streaming"


def _check_tokens(model: nn.Module, token_ids: object) -> Tensor:
    if not isinstance(token_ids, Tensor):
        raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be 1-D (seq,), got shape {tuple(token_ids.shape)}")
    if (
        token_ids.dtype.is_floating_point
        or token_ids.dtype.is_complex
        or token_ids.dtype == (torch.bool)
    ):
        raise TypeError(f"token_ids must hold integers, got dtype {token_ids.dtype}")
    if token_ids.numel() < 2:
        raise ValueError(
            f"token_ids must hold at least 2 tokens (one to read, one to score), "
            f"got {token_ids.numel()}"
        )
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    lo, hi = int(token_ids.min()), int(token_ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(
            f"token_ids must lie in [0, {vocab}) (the model's vocabulary), got [{lo}, {hi}]"
        )
    return token_ids.long()


def _token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token cross entropy, at least in float32 (bf16 log-softmax is too coarse), as f64."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="none").double()


def _result(nll: Tensor, positions: Tensor, context, stride, mode: str) -> PerplexityResult:
    mean = float(nll.sum() / nll.numel())  # float64 sum: no drift over long streams
    return PerplexityResult(
        math.exp(mean), mean, nll.numel(), context, stride, nll, positions, mode
    )


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first) per window: inputs [begin, end) score targets [first, end + 1).

    Input i of a window predicts token i + 1, so `context` inputs score up to `context`
    targets; a window scores only targets after the previous window's last one.
    """
    windows, scored_to, begin = [], 0, 0  # targets 1 .. scored_to are done
    while scored_to < n_tokens - 1:
        end = min(begin + context, n_tokens - 1)
        windows.append((begin, end, scored_to + 1))
        scored_to, begin = end, begin + stride
    return windows


def _sliding(model, ids, context, stride, batch_size, progress) -> PerplexityResult:
    windows = sliding_windows(ids.numel(), context, stride)
    total = ids.numel() - 1
    nlls, positions, done, i = [], [], 0, 0
    while i < len(windows):
        # Windows of one length (all but the last) go through the model together.
        length = windows[i][1] - windows[i][0]
        group = [w for w in windows[i : i + batch_size] if w[1] - w[0] == length]
        inputs = torch.stack([ids[b:e] for b, e, _ in group])
        logits = model(inputs)
        for row, (begin, end, first) in enumerate(group):
            scored = logits[row, first - 1 - begin : end - begin]
            nlls.append(_token_nll(scored, ids[first : end + 1]))
            positions.append(torch.arange(first, end + 1, device=ids.device))
            done += end + 1 - first
        i += len(group)
        if progress is not None:
            progress(done, total)
    return _result(torch.cat(nlls), torch.cat(positions), context, stride, "sliding")


def fresh_cache(model: nn.Module, cache_factory: Callable[[], KVCache] | None) -> KVCache:
    """`cache_factory()` (default `model.new_cache(1)`), checked to hold one empty sequence."""
    cache = model.new_cache(1) if cache_factory is None else cache_factory()
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache_factory must return a KVCache, got {type(cache).__name__}")
    if len(cache.sequences) != 1 or cache.length(cache.sequences[0]) != 0:
        lengths = {s: cache.length(s) for s in cache.sequences}
        raise ValueError(
            "cache_factory must return a fresh cache holding one empty sequence "
            f"(e.g. lambda: model.new_cache(1)); got sequence lengths {lengths}"
        )
    return cache


def _streaming(model, ids, cache_factory, chunk_size, progress) -> PerplexityResult:
    cache = fresh_cache(model, cache_factory)
    limit = cache.max_step_tokens  # ring and eviction caches bound a step's tokens
    chunk = min(chunk_size, limit) if limit is not None else chunk_size
    inputs, total = ids[:-1], ids.numel() - 1  # the last token is only a target
    nlls, positions = [], []
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        logits = model(inputs[start:end].unsqueeze(0), cache=cache)
        nlls.append(_token_nll(logits[0], ids[start + 1 : end + 1]))
        positions.append(torch.arange(start + 1, end + 1, device=ids.device))
        if progress is not None:
            progress(end, total)
    return _result(torch.cat(nlls), torch.cat(positions), None, None, "streaming")


@torch.no_grad()
def perplexity(
    model: nn.Module,
    token_ids: Tensor,
    *,
    context: int | None = None,
    stride: int | None = None,
    cache_factory: Callable[[], KVCache] | None = None,
    chunk_size: int = 64,
    batch_size: int | None = None,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on the 1-D `token_ids`, scoring every token after the first once.

    Without `cache_factory`: sliding windows of `context` input tokens every `stride`
    (default `context // 2`) tokens, `batch_size` windows per forward (default: as many
    as fit in 2048 tokens). With it: the tokens stream through `cache_factory()` (a fresh
    cache with one empty sequence) `chunk_size` tokens at a time (fewer if the cache caps
    a step's tokens, `max_new_per_step`); `context` and `stride` must then be left out.
    `progress(done, total)` is called after each forward with targets scored so far.
    """
    ids = _check_tokens(model, token_ids).to(next(model.parameters()).device)
    if cache_factory is not None:
        if context is not None or stride is not None:
            raise ValueError(
                f"context ({context}) and stride ({stride}) are for sliding windows; with "
                "cache_factory the cache decides what each token sees: leave them out"
            )
        if not callable(cache_factory):
            raise TypeError(f"cache_factory must be callable, got {type(cache_factory).__name__}")
        check_positive_int("chunk_size", chunk_size)
        return _streaming(model, ids, cache_factory, chunk_size, progress)
    if context is None:
        raise ValueError(
            "context is required for sliding-window perplexity (or give cache_factory)"
        )
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise ValueError(f"context must be an integer >= 2 (tokens per window), got {context!r}")
    stride = context // 2 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= context:
        raise ValueError(
            f"stride must be an integer in [1, context={context}] so that windows leave no "
            f"token unscored, got {stride!r}"
        )
    if batch_size is None:
        batch_size = max(1, 2048 // context)
    check_positive_int("batch_size", batch_size)
    return _sliding(model, ids, context, stride, batch_size, progress)
