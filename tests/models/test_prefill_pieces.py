"""A long prefill into a lossless cache goes through the blocks in pieces, computing what the
whole prompt would; caches and layers where pieces would change the result (or were not
measured) take it whole."""

from __future__ import annotations

import pytest
import torch

from attn_testing import tiny_transformer
from attnkit.cache import H2OCache, PagedCache, QuantizedCache
from attnkit.layers.attention import Attention
from attnkit.models import llama

PIECE = 8
TOKENS = 21  # pieces of 8, 8 and 5


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(llama, "PREFILL_PIECE", PIECE)


def float32_model(**overrides):
    return tiny_transformer(0, **overrides).float()


def prompt(batch: int = 2):
    return torch.randint(0, 101, (batch, TOKENS), generator=torch.Generator().manual_seed(3))


def passes(cache) -> list[int]:
    """Records the token count of each `prepare` (one per pass through the blocks)."""
    counts = []
    prepare = cache.prepare

    def counting(seq_ids, n_new, **kwargs):
        counts.append(n_new)
        return prepare(seq_ids, n_new, **kwargs)

    cache.prepare = counting
    return counts


def paged(model, batch: int = 2) -> PagedCache:
    c = model.config
    cache = PagedCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks=16)
    for _ in range(batch):
        cache.add_sequence()
    return cache


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@torch.no_grad()
def test_pieces_give_the_whole_prompts_logits(kind):
    model = float32_model()
    ids = prompt()
    whole = model(ids)  # no cache: one pass, a causal mask
    cache = model.new_cache(2) if kind == "contiguous" else paged(model)
    counts = passes(cache)
    logits = model(ids, cache=cache)
    assert counts == [8, 8, 5]
    # float32, the same kernels over pieces of the keys: 1e-5
    assert (logits - whole).abs().max() < 1e-5
    assert cache.length(0) == cache.length(1) == TOKENS
    # the next token decodes as after a whole prefill
    nxt = torch.tensor([[5], [7]])
    after_whole = model(torch.cat((ids, nxt), dim=1))[:, -1]
    assert (model(nxt, cache=cache)[:, -1] - after_whole).abs().max() < 1e-5


@torch.no_grad()
def test_last_only_and_logits_at_read_the_right_piece():
    model = float32_model()
    ids = prompt(3)
    whole = model(ids)
    at = torch.tensor([20, 3, 9])  # the last piece, the first, the second
    picked = model(ids, cache=model.new_cache(3), logits_at=at)
    assert (picked[:, 0] - whole[torch.arange(3), at]).abs().max() < 1e-5
    last = model(ids, cache=model.new_cache(3), last_only=True)
    assert (last - whole[:, -1:]).abs().max() < 1e-5


@torch.no_grad()
def test_positions_are_sliced_with_the_tokens():
    model = float32_model()
    ids = prompt()
    shifted = torch.arange(TOKENS) + 100
    whole = model(ids, cache=model.new_cache(2), positions=shifted)  # pieces
    model_whole = model(ids, positions=shifted)  # no cache: one pass
    assert (whole - model_whole).abs().max() < 1e-5


@pytest.mark.parametrize(
    "setup",
    ["quantized cache", "h2o cache", "float64 model", "sdpa backend", "short prompt"],
)
@torch.no_grad()
def test_whole_where_pieces_do_not_apply(setup):
    model = tiny_transformer(0) if setup == "float64 model" else float32_model()
    c = model.config
    ids = prompt()[:, :PIECE] if setup == "short prompt" else prompt()
    if setup == "quantized cache":
        cache = QuantizedCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_seqs=2)
        for _ in range(2):
            cache.add_sequence()
    elif setup == "h2o cache":
        cache = H2OCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, budget=64, recent=8, max_seqs=2
        )
        for _ in range(2):
            cache.add_sequence()
    else:
        cache = model.new_cache(2)
    if setup == "sdpa backend":
        for block in model.blocks:
            assert isinstance(block.attn, Attention)
            block.attn.backend = "sdpa"
    counts = passes(cache)
    model(ids, cache=cache)
    assert counts == [ids.shape[1]]
