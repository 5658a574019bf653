"""Perplexity: sliding windows score every token once; streaming equals a masked full forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.cache.contiguous import ContiguousCache
from attnkit.cache.eviction import StreamingLLMCache
from attnkit.cache.window import SlidingWindowCache
from attnkit.layers.attention import AttentionContext
from attnkit.masks import causal, sinks, sliding_window
from attnkit.tools.perplexity import perplexity, sliding_windows
from models.test_llama import tiny


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed))


def masked_forward(model, ids: torch.Tensor, mask) -> torch.Tensor:
    """The model's forward on one sequence with `mask` in place of causal (no cache)."""
    positions = torch.arange(ids.numel())
    x = model.embed(ids.unsqueeze(0))
    cos, sin = model.rope.cos_sin(positions, x.dtype)
    ctx = AttentionContext(cos, sin, mask, None, model.config.rope_interleaved)
    for block in model.blocks:
        x = block(x, ctx)
    return model.lm_head(model.norm(x))[0]


def full_nll(model, ids: torch.Tensor, mask=None) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]) for t = 1 .. len-1 from one forward, in float64."""
    logits = masked_forward(model, ids, mask or causal())
    return F.cross_entropy(logits[:-1].double(), ids[1:], reduction="none")


@pytest.fixture(scope="module")
def model():
    return tiny(seed=7)


# (len, context, stride): windows that overlap, tile exactly, leave a short last window,
# hold one target each, or cover everything at once.
AWKWARD = [(2, 2, 1), (7, 2, 2), (7, 3, 1), (97, 16, 5), (97, 16, 16), (97, 96, 1), (98, 9, 8)]
AWKWARD += [(50, 7, 3), (10, 100, None), (64, 12, 7)]


@pytest.mark.parametrize(("n", "context", "stride"), AWKWARD, ids=str)
def test_windows_score_every_target_exactly_once_with_bounded_context(n, context, stride):
    stride = context // 2 if stride is None else stride
    scored = []
    for begin, end, first in sliding_windows(n, context, stride):
        assert 0 <= begin < first <= end <= n - 1 and end - begin <= context
        # the target scored first sees context - stride + 1 tokens, or all tokens before it
        assert first - begin >= min(first, context - stride + 1)
        scored += range(first, end + 1)
    assert scored == list(range(1, n))


@pytest.mark.parametrize(("n", "context", "stride"), AWKWARD, ids=str)
@torch.no_grad()
def test_sliding_perplexity_scores_every_target_exactly_once(model, n, context, stride):
    ids = tokens(n, seed=n + context)
    calls = []
    result = perplexity(
        model, ids, context=context, stride=stride, progress=lambda *a: calls.append(a)
    )
    assert result.n_tokens == n - 1 == result.nll.numel() and result.mode == "sliding"
    assert torch.equal(result.positions, torch.arange(1, n))
    assert (result.context, result.stride) == (context, stride or context // 2)
    assert calls[-1] == (n - 1, n - 1) and calls == sorted(calls)
    assert result.nll.dtype == torch.float64 and bool(torch.isfinite(result.nll).all())


@pytest.mark.parametrize(
    ("n", "context", "stride"), [(7, 3, 1), (50, 7, 3), (45, 8, 8), (10, 100, None)], ids=str
)
@torch.no_grad()
def test_sliding_perplexity_equals_one_forward_per_target(model, n, context, stride):
    ids = tokens(n, seed=n + context)
    result = perplexity(model, ids, context=context, stride=stride)
    stride = context // 2 if stride is None else stride
    # Direct computation: target t alone, from the window start that first covers it.
    want = []
    for t in range(1, n):
        k = next(k for k in range(n) if min(k * stride + context, n - 1) >= t)
        logits = model(ids[k * stride : t].unsqueeze(0))[0, -1]
        want.append(-torch.log_softmax(logits, -1)[ids[t]])
    assert (result.nll - torch.stack(want)).abs().max() < 1e-12
    assert abs(result.mean_nll - torch.stack(want).mean().item()) < 1e-12
    assert math.isclose(result.perplexity, math.exp(result.mean_nll), rel_tol=1e-15)


@pytest.mark.parametrize("context", [36, 37, 50])
@torch.no_grad()
def test_a_context_covering_everything_equals_one_forward(model, context):
    ids = tokens(37, seed=3)
    result = perplexity(model, ids, context=context)
    ce = F.cross_entropy(model(ids.unsqueeze(0))[0, :-1], ids[1:])
    assert result.n_tokens == 36
    assert abs(result.perplexity - math.exp(ce.item())) < 1e-12 * math.exp(ce.item())


@torch.no_grad()
def test_batching_windows_does_not_change_the_result(model):
    ids = tokens(61, seed=4)
    results = [perplexity(model, ids, context=10, stride=4, batch_size=b) for b in (1, 3, 64)]
    for r in results[1:]:
        assert (r.nll - results[0].nll).abs().max() < 1e-12


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@torch.no_grad()
def test_streaming_through_a_contiguous_cache_equals_the_full_forward(model, chunk_size):
    ids = tokens(45, seed=5)
    result = perplexity(
        model, ids, cache_factory=lambda: model.new_cache(1, initial_len=8), chunk_size=chunk_size
    )
    assert result.mode == "streaming" and result.context is None and result.n_tokens == 44
    assert torch.equal(result.positions, torch.arange(1, 45))
    assert (result.nll - full_nll(model, ids)).abs().max() < 1e-12  # float64 model


@pytest.mark.parametrize("chunk_size", [3, 64])
@torch.no_grad()
def test_streaming_through_a_window_cache_equals_the_window_masked_forward(model, chunk_size):
    ids, window = tokens(53, seed=6), 9
    c = model.config

    def factory():  # max_new_per_step=5 must cap chunk_size=64
        cache = SlidingWindowCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, window=window,
            max_new_per_step=5, dtype=torch.float64,
        )  # fmt: skip
        cache.add_sequence()
        return cache

    result = perplexity(model, ids, cache_factory=factory, chunk_size=chunk_size)
    want = full_nll(model, ids, sliding_window(window))
    assert (result.nll - want).abs().max() < 1e-12
    # the window matters: targets that would see more than `window` tokens score differently
    assert (result.nll[window:] - full_nll(model, ids)[window:]).abs().min() > 0


@torch.no_grad()
def test_streaming_llm_cache_equals_the_sinks_and_window_masked_forward(model):
    ids, budget, n_sinks = tokens(40, seed=8), 12, 3
    c = model.config

    def factory():
        cache = StreamingLLMCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, budget=budget,
            sinks=n_sinks, max_new_per_step=4, dtype=torch.float64,
        )  # fmt: skip
        cache.add_sequence()
        return cache

    result = perplexity(model, ids, cache_factory=factory)
    want = full_nll(model, ids, sliding_window(budget - n_sinks + 1) | sinks(n_sinks))
    assert (result.nll - want).abs().max() < 1e-12


@torch.no_grad()
def test_float32_streaming_matches_the_float64_forward_as_closely_as_a_float32_forward():
    model64 = tiny(seed=9)
    model32 = tiny(seed=9).float()
    ids = tokens(33, seed=9)
    want = full_nll(model64, ids)
    plain = full_nll(model32, ids)
    got = perplexity(model32, ids, cache_factory=lambda: model32.new_cache(1), chunk_size=5).nll
    assert got.dtype == torch.float64
    # the 2x rule against a plain float32 forward, with float32's noise floor
    err, plain_err = (got - want).abs().max(), (plain - want).abs().max()
    assert err <= 2 * plain_err + 4 * torch.finfo(torch.float32).eps


def test_bad_inputs_are_named(model):
    ids = tokens(20)
    bad = [
        (dict(token_ids=ids, context=1), ValueError, "context must be an integer >= 2.*got 1"),
        (dict(token_ids=ids, context=8, stride=9), ValueError, r"\[1, context=8\].*got 9"),
        (dict(token_ids=ids, context=8, stride=0), ValueError, "stride must be .*got 0"),
        (dict(token_ids=ids), ValueError, "context is required"),
        (dict(token_ids=ids.view(4, 5), context=4), ValueError, r"1-D.*got shape \(4, 5\)"),
        (dict(token_ids=ids[:1], context=4), ValueError, "at least 2 tokens.*got 1"),
        (dict(token_ids=ids.float(), context=4), TypeError, "integers, got dtype torch.float32"),
        (dict(token_ids=ids.tolist(), context=4), TypeError, "torch.Tensor, got list"),
        (dict(token_ids=ids + 100, context=4), ValueError, r"\[0, 101\).*got \[\d+, \d+\]"),
        (dict(token_ids=ids, context=8, batch_size=0), ValueError, "batch_size must be"),
        (
            dict(token_ids=ids, context=8, cache_factory=lambda: model.new_cache(1)),
            ValueError,
            "context \\(8\\) and stride \\(None\\) are for sliding windows",
        ),
        (dict(token_ids=ids, cache_factory=lambda: model.new_cache(2)), ValueError, "one empty"),
        (dict(token_ids=ids, cache_factory=lambda: 3), TypeError, "return a KVCache, got int"),
        (dict(token_ids=ids, cache_factory=3), TypeError, "cache_factory must be callable"),
        (
            dict(token_ids=ids, cache_factory=lambda: model.new_cache(1), chunk_size=0),
            ValueError,
            "chunk_size must be an integer >= 1, got 0",
        ),
    ]  # fmt: skip
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            perplexity(model, **kwargs)


def test_a_used_cache_is_refused(model):
    cache = ContiguousCache(3, 3, 6, dtype=torch.float64)
    seq = cache.add_sequence()
    cache.prepare([seq], 2)
    with pytest.raises(ValueError, match=r"one empty sequence.*lengths \{0: 2\}"):
        perplexity(model, tokens(9), cache_factory=lambda: cache)
