"""A long prefill into a lossless cache goes through the blocks in pieces, computing what the
whole prompt would; caches, models and layers where pieces would change the result (or were
not measured) take it whole."""

from __future__ import annotations

import pytest
import torch

from attn_testing import tiny_transformer
from attnkit.cache import CacheFull, H2OCache, PagedCache, QuantizedCache
from attnkit.layers.attention import Attention
from attnkit.layers.rope import DynamicNTKScaling
from attnkit.models import llama
from attnkit.ops.backends.banded import BandedBackend

# 16 positions x 3 query heads a KV head: 48 query rows, enough for the banded kernel
# (32-row blocks), which serves the pieces in production
PIECE = 16
TOKENS = 45  # pieces of 16, 16 and 13
PIECES = [16, 16, 13]


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(llama, "PREFILL_PIECE", PIECE)


def float32_model(**overrides):
    return tiny_transformer(0, **overrides).float()


def prompt(batch: int = 2, tokens: int = TOKENS):
    return torch.randint(0, 101, (batch, tokens), generator=torch.Generator().manual_seed(3))


def passes(cache) -> list[int]:
    """Records the token count of each `prepare` (one per pass through the blocks)."""
    counts = []
    prepare = cache.prepare

    def counting(seq_ids, n_new, **kwargs):
        counts.append(n_new)
        return prepare(seq_ids, n_new, **kwargs)

    cache.prepare = counting
    return counts


def paged(model, batch: int = 2, num_blocks: int = 16) -> PagedCache:
    c = model.config
    cache = PagedCache(
        c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks=num_blocks
    )
    for _ in range(batch):
        cache.add_sequence()
    return cache


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@torch.no_grad()
def test_pieces_give_the_whole_prompts_logits(kind, monkeypatch):
    model = float32_model()
    ids = prompt()
    whole = model(ids)  # no cache: one pass, a causal mask
    cache = model.new_cache(2) if kind == "contiguous" else paged(model)
    counts = passes(cache)
    offsets = []  # the banded kernel's query offsets: pieces after the first start past 0
    run = BandedBackend.run
    monkeypatch.setattr(
        BandedBackend, "run", lambda self, p: offsets.append(p.q_offset) or run(self, p)
    )
    logits = model(ids, cache=cache)
    assert counts == PIECES
    assert sorted(set(offsets)) == [0, 16, 32]
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
    at = torch.tensor([44, 3, 20])  # the last piece, the first, the second
    picked = model(ids, cache=model.new_cache(3), logits_at=at)
    assert (picked[:, 0] - whole[torch.arange(3), at]).abs().max() < 1e-5
    last = model(ids, cache=model.new_cache(3), last_only=True)
    assert (last - whole[:, -1:]).abs().max() < 1e-5


@pytest.mark.parametrize("shape", ["(seq,)", "(batch, seq)"])
@torch.no_grad()
def test_positions_are_sliced_with_the_tokens(shape):
    model = float32_model()
    ids = prompt()
    positions = torch.arange(TOKENS) + 100
    if shape == "(batch, seq)":
        positions = torch.stack((positions, positions + 7))
    cache = model.new_cache(2)
    counts = passes(cache)
    pieced = model(ids, cache=cache, positions=positions)
    one_pass = model(ids, positions=positions)  # no cache: one pass
    assert counts == PIECES
    assert (pieced - one_pass).abs().max() < 1e-5


@torch.no_grad()
def test_pieces_extend_the_named_sequences_only():
    model = float32_model()
    cache = model.new_cache(3)
    ids = prompt()
    whole = model(ids)
    counts = passes(cache)
    logits = model(ids.flip(0), cache=cache, seq_ids=[2, 0])
    assert counts == PIECES
    assert (logits.flip(0) - whole).abs().max() < 1e-5
    assert [cache.length(s) for s in (0, 1, 2)] == [TOKENS, 0, TOKENS]


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@torch.no_grad()
def test_a_piece_that_does_not_fit_leaves_the_cache_as_it_was(kind):
    model = float32_model()
    if kind == "contiguous":
        cache = model.new_cache(2, max_len=20)  # the first piece fits, the second does not
        free = None
    else:
        cache = paged(model, num_blocks=5)  # 2 x 32 tokens fit (4 blocks), 2 x 45 do not
        free = cache.num_free_blocks
    with pytest.raises(CacheFull):
        model(prompt(), cache=cache)
    assert cache.length(0) == cache.length(1) == 0
    if free is not None:
        assert cache.num_free_blocks == free
    # and it still serves a prompt that fits
    short = prompt(tokens=5)
    assert (model(short, cache=cache) - model(short)).abs().max() < 1e-5


def test_positions_of_another_length_are_refused():
    model = float32_model()
    with pytest.raises(
        ValueError, match=r"positions must hold one position per token: last dim 32"
    ):
        model(prompt(tokens=32), cache=model.new_cache(2), positions=torch.arange(40))


@pytest.mark.parametrize(
    "setup",
    [
        "quantized cache",
        "h2o cache",
        "float64 model",
        "sdpa backend",
        "dynamic NTK",
        "forward hook",
        "short prompt",
    ],
)
@torch.no_grad()
def test_whole_where_pieces_do_not_apply(setup):
    if setup == "float64 model":
        model = tiny_transformer(0)
    elif setup == "dynamic NTK":  # its frequencies follow each call's longest position
        scaling = DynamicNTKScaling(factor=2.0, original_max_position_embeddings=20)
        model = float32_model(rope_scaling=scaling)
    else:
        model = float32_model()
    c = model.config
    ids = prompt(tokens=PIECE) if setup == "short prompt" else prompt()
    if setup == "quantized cache":
        cache = QuantizedCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_seqs=2)
    elif setup == "h2o cache":
        cache = H2OCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, budget=64, recent=8, max_seqs=2
        )
    else:
        cache = model.new_cache(2)
    if setup in ("quantized cache", "h2o cache"):
        for _ in range(2):
            cache.add_sequence()
    if setup == "sdpa backend":
        for block in model.blocks:
            assert isinstance(block.attn, Attention)
            block.attn.backend = "sdpa"
    seen = []
    if setup == "forward hook":  # a hook would see pieces
        model.blocks[1].register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    counts = passes(cache)
    logits = model(ids, cache=cache)
    assert counts == [ids.shape[1]]
    assert seen == ([ids.shape[1]] if setup == "forward hook" else [])
    if setup == "dynamic NTK":
        assert (logits - model(ids)).abs().max() < 1e-5
