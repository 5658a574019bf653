"""Sliding-window and sparse attention layers in the model, with ring buffers for windows.

The oracle for a layer's pattern is its definition written out as a dense boolean matrix
over absolute positions; the oracle for cached decoding is one full forward (float64,
tolerance 1e-12, since both compute the same sums in a different order); the oracle for
Mistral/Qwen2 configs is transformers (float32, 1e-5 as for the other loaders).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from test_llama import tiny
from test_loading import VOCAB, attnkit_model, max_logit_diff, tiny_hf

from attn_testing import tiny_transformer
from attnkit.cache import ContiguousCache, SlidingWindowCache
from attnkit.cache.base import CacheFull
from attnkit.cache.layered import LayeredCache
from attnkit.cache.paged import PagedCache
from attnkit.engine import generate
from attnkit.layers.attention import Attention, AttentionContext
from attnkit.masks import block_sparse, causal, strided
from attnkit.models.convert.mla import to_mla
from attnkit.models.hf_dir import read_config, read_weights
from attnkit.models.llama import Transformer, default_attention
from attnkit.ops.attention import attention
from attnkit.ops.masks import from_tensor
from engine.test_generate import DigitTokenizer, plain_greedy

ALTERNATING = ("sliding_attention", "full_attention", "sliding_attention")


def windowed(seed=0, window=4, layer_types=ALTERNATING, **overrides) -> Transformer:
    return tiny(seed, sliding_window=window, layer_types=layer_types, **overrides)


def with_pattern(pattern=None, window=None, sinks=0, seed=0) -> Transformer:
    """A tiny model whose middle layer has its own pattern (or window + sinks)."""

    def factory(config, i):
        if i != 1:
            return default_attention(config, i)
        return Attention(i, 54, 9, 3, 6, window=window, sinks=sinks, pattern=pattern)

    return tiny_transformer(seed, factory)


def ids(batch=2, n=30, seed=1):
    return torch.randint(0, 101, (batch, n), generator=torch.Generator().manual_seed(seed))


def decode(model, tokens, chunks, **cache_options):
    cache = model.new_cache(tokens.shape[0], **cache_options)
    pieces, start = [], 0
    for n in chunks:
        pieces.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    return torch.cat(pieces, dim=1), cache


# -- a layer's pattern is exactly its definition ------------------------------------------

PATTERNS = {  # constructor arguments, and the rule over query position i and key position j
    "window 4": ({"window": 4}, lambda i, j: (j <= i) & (i - j < 4)),
    "window 1": ({"window": 1}, lambda i, j: j == i),
    "window 3 + 2 sinks": (
        {"window": 3, "sinks": 2},
        lambda i, j: (j <= i) & ((i - j < 3) | (j < 2)),
    ),
    "strided 5": ({"pattern": strided(5)}, lambda i, j: (j <= i) & ((i - j) % 5 == 0)),
}


@pytest.mark.parametrize("case", PATTERNS)
@torch.no_grad()
def test_a_layer_attends_exactly_where_its_pattern_says(case):
    kwargs, rule = PATTERNS[case]
    torch.manual_seed(0)
    layer = Attention(0, 54, 9, 3, 6, **kwargs).double()
    x, n = torch.randn(2, 23, 54, dtype=torch.float64), 23
    cos, sin = torch.zeros(n, 3, dtype=torch.float64), torch.zeros(n, 3, dtype=torch.float64)
    cos += 1  # angle 0: no rotation, so the check below can skip RoPE
    out = layer(x, AttentionContext(cos, sin, causal(), None, False))

    i, j = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    dense = from_tensor(rule(i, j).view(1, 1, n, n))
    q = layer.wq(x).view(2, n, 9, 6).transpose(1, 2)
    k = layer.wk(x).view(2, n, 3, 6).transpose(1, 2)
    v = layer.wv(x).view(2, n, 3, 6).transpose(1, 2)
    expected = layer.wo(attention(q, k, v, dense, backend="reference").transpose(1, 2).flatten(2))
    assert (out - expected).abs().max() < 1e-12


# -- decoding through the cache equals one full forward -----------------------------------


@pytest.mark.parametrize("chunks", [[10, 4, 6, 10], [1] * 30, [29, 1], [30]], ids=str)
@torch.no_grad()
def test_alternating_window_layers_decode_through_ring_buffers(chunks):
    model = windowed()
    tokens = ids()
    out, cache = decode(model, tokens, chunks, max_new_per_step=8)  # [30]: split in 8s
    assert (out - model(tokens)).abs().max() < 1e-12
    assert isinstance(cache, LayeredCache)
    kinds = {type(c): layers for c, layers in zip(cache.caches, ([0, 2], [1]), strict=True)}
    assert kinds == {SlidingWindowCache: [0, 2], ContiguousCache: [1]}


def paged_decode_logits(model, tokens, chunks, cache):
    for _ in range(tokens.shape[0]):
        cache.add_sequence()
    pieces, start = [], 0
    for n in chunks:
        pieces.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize(
    ("layer_types", "pools"),
    [(None, {(4, 0): [0, 1, 2]}), (ALTERNATING, {(4, 0): [0, 2], (None, 0): [1]})],
    ids=["every layer slides", "alternating"],
)
@torch.no_grad()
def test_new_paged_cache_takes_the_models_windows_and_decodes_as_one_forward(layer_types, pools):
    # Every layer sliding: one pool, giving back blocks behind the window. Windowed and
    # global layers mixed: a pool per kind in a LayeredCache, the windowed layers' giving
    # back blocks, the global layers' keeping every token.
    model = windowed(layer_types=layer_types)
    tokens = ids()
    cache = model.new_paged_cache(40, block_size=3, seed=2)
    groups = [(cache, list(range(3)))] if isinstance(cache, PagedCache) else None
    if groups is None:
        assert isinstance(cache, LayeredCache)
        groups = [(c, [i for i in range(3) if cache._route[i][0] is c]) for c in cache.caches]
    assert {(c.window, c.sinks): layers for c, layers in groups} == pools
    for c, layers in groups:
        assert c.k_pool.dtype == torch.float64 and c.n_layers == len(layers)
        assert c.num_blocks == 40
    out = paged_decode_logits(model, tokens, [10, 4, 6] + [1] * 10, cache)
    assert (out - model(tokens)).abs().max() < 1e-12
    for c, _ in groups:  # token 29 sees 26-29: blocks of tokens 0-23 went back
        assert c.block_table(0).count(-1) == (0 if c.window is None else 8)


def test_new_paged_cache_names_layers_it_cannot_hold():
    model = to_mla(tiny(0), 7, rope_dim=4, calibration=torch.arange(40).view(1, -1))
    with pytest.raises(ValueError, match=r"serves K/V self-attention layers \(Attention\), "):
        model.new_paged_cache(8)
    assert tiny(0).new_paged_cache(8, block_size=4, window=6).window == 6  # kwargs win
    sinking = with_pattern(window=4, sinks=2)  # only its middle layer slides: two pools
    pools = sinking.new_paged_cache(8).caches
    assert sorted((c.window or 0, c.sinks, c.n_layers) for c in pools) == [(0, 0, 2), (4, 2, 1)]
    assert sinking.new_paged_cache(8, window=None).n_layers == 3  # one pool, every token
    every = tiny_transformer(0, lambda c, i: Attention(i, 54, 9, 3, 6, window=4, sinks=2))
    assert (every.new_paged_cache(8).window, every.new_paged_cache(8).sinks) == (4, 2)
    assert every.new_paged_cache(8, window=8).sinks == 2  # the model's sinks kept
    assert every.new_paged_cache(8, window=None).sinks == 0


@pytest.mark.parametrize("case", ["window 3 + 2 sinks", "strided 5", "block-sparse"])
@pytest.mark.parametrize("chunks", [[10, 4, 6, 10], [1] * 30], ids=str)
@torch.no_grad()
def test_pattern_layers_decode_through_the_cache(case, chunks):
    if case == "block-sparse":
        layout = torch.rand(8, 8, generator=torch.Generator().manual_seed(5)) < 0.5
        model = with_pattern(pattern=causal() & block_sparse(layout, block_size=4))
    else:
        model = with_pattern(**PATTERNS[case][0])
    tokens = ids()
    out, _ = decode(model, tokens, chunks, max_new_per_step=8)
    assert (out - model(tokens)).abs().max() < 1e-12


@torch.no_grad()
def test_a_window_of_the_whole_sequence_equals_full_attention():
    tokens = ids(n=20)
    full = tiny()(tokens)
    assert (windowed(window=20, layer_types=None)(tokens) - full).abs().max() < 1e-12
    assert (windowed(window=19, layer_types=None)(tokens) - full).abs().max() > 1e-6


@torch.no_grad()
def test_ragged_batch_through_ring_buffers_equals_each_sequence_alone():
    model = windowed()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 101, (1, n), generator=gen) for n in (9, 2, 13)]
    steps = torch.randint(0, 101, (3, 6), generator=gen)
    cache = model.new_cache(3, max_new_per_step=4)
    for seq, prompt in enumerate(prompts):
        model(prompt, cache=cache, seq_ids=[seq])
    batched = torch.cat([model(steps[:, i : i + 1], cache=cache) for i in range(6)], dim=1)
    for seq, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, steps[seq : seq + 1]], dim=1))[:, -6:]
        assert (batched[seq] - alone[0]).abs().max() < 1e-12


@torch.no_grad()
def test_window_layers_memory_stays_flat_while_global_layers_grow():
    model = windowed()
    cache = model.new_cache(1, max_new_per_step=8, initial_len=16)
    ring, full = cache.caches
    sizes = []
    for _ in range(10):
        model(ids(1, 8), cache=cache)
        sizes.append((ring.nbytes, full.nbytes))
    assert len({r for r, _ in sizes}) == 1  # the ring never grows
    assert sizes[-1][1] > sizes[0][1]  # the global layer's K/V did
    assert cache.nbytes == sum(sizes[-1])


def test_generate_with_a_windowed_model_equals_uncached_greedy():
    model = windowed(window=3, layer_types=None, vocab_size=27)
    prompt = [3, 5, 7, 9, 11, 2, 4, 6, 8, 10, 12]
    result = generate(model, DigitTokenizer(), prompt, 12, stop_token_ids=())
    assert result[0].token_ids == plain_greedy(model, prompt, 12)


# -- the layered cache keeps its groups in lockstep ----------------------------------------


@torch.no_grad()
def test_layered_cache_fork_truncate_free():
    model = windowed()
    tokens = ids(1, 20)
    cache = model.new_cache(1, max_seqs=2, max_new_per_step=8)
    model(tokens[:, :12], cache=cache)
    child = cache.fork(0)
    model(tokens[:, 12:16], cache=cache, seq_ids=[0])
    cache.truncate(0, 12)  # rollback within the ring's slack
    out = model(tokens[:, 12:20], cache=cache, seq_ids=[0])
    assert (out - model(tokens)[:, 12:20]).abs().max() < 1e-12
    forked = model(tokens[:, 12:20], cache=cache, seq_ids=[child])
    assert (forked - out).abs().max() < 1e-12
    with pytest.raises(CacheFull):  # both slots are taken: no group keeps a half fork
        cache.fork(0)
    assert all(c.sequences == [0, child] for c in cache.caches)
    cache.free(0)
    assert cache.sequences == [child] and all(c.sequences == [child] for c in cache.caches)
    with pytest.raises(ValueError, match="cannot truncate sequence 1 from 20 to 2 tokens"):
        cache.truncate(child, 2)
    assert all(c.length(child) == 20 for c in cache.caches)  # the refusal changed nothing


@torch.no_grad()
def test_layered_cache_full_changes_nothing():
    ring = SlidingWindowCache(2, 3, 6, window=4, max_new_per_step=8, dtype=torch.float64)
    full = ContiguousCache(1, 3, 6, max_len=10, dtype=torch.float64)
    cache = LayeredCache([([0, 2], ring), ([1], full)])
    cache.add_sequence()
    model = windowed()
    model(ids(1, 8), cache=cache)
    with pytest.raises(CacheFull):
        model(ids(1, 4), cache=cache)
    assert cache.length(0) == ring.length(0) == full.length(0) == 8


LAYERED_ERRORS = {
    "no groups": ([], ValueError, "at least one"),
    "gap": ([([0, 2], "ring")], ValueError, r"cover layers 0\.\.1, got \[0, 2\]"),
    "twice": ([([0], "ring"), ([0], "full")], ValueError, "layer 0 is in more than one group"),
    "not a cache": ([([0], object())], TypeError, "each group needs a KVCache, got object"),
}


@pytest.mark.parametrize("case", LAYERED_ERRORS)
def test_layered_cache_rejects_bad_groups(case):
    groups, error, message = LAYERED_ERRORS[case]
    made = {"ring": SlidingWindowCache(2, 1, 4, window=3), "full": ContiguousCache(1, 1, 4)}
    groups = [(layers, made.get(c, c) if isinstance(c, str) else c) for layers, c in groups]
    with pytest.raises(error, match=message):
        LayeredCache(groups)


# -- configs, and loading Mistral / Qwen2 sliding-window checkpoints ----------------------

BAD_LAYERS = {
    "window 0": ({"window": 0}, ValueError, "window must be an integer >= 1, got 0"),
    "sinks alone": ({"sinks": 2}, ValueError, "sinks=2 needs a window"),
    "negative sinks": ({"window": 4, "sinks": -1}, ValueError, "sinks must be an integer >= 0"),
    "both": ({"window": 4, "pattern": causal()}, ValueError, "give window=4 or pattern="),
    "pattern tensor": ({"pattern": torch.ones(3, 3)}, TypeError, "pattern must be an attnkit"),
}


@pytest.mark.parametrize("case", BAD_LAYERS)
def test_bad_layer_patterns(case):
    kwargs, error, message = BAD_LAYERS[case]
    with pytest.raises(error, match=message):
        Attention(0, 54, 9, 3, 6, **kwargs)


BAD_CONFIGS = {
    "window 0": ({"sliding_window": 0}, "LlamaConfig.sliding_window must be an integer >= 1"),
    "too few types": ({"sliding_window": 4, "layer_types": ("full_attention",)}, "names 1 layers"),
    "unknown type": (
        {"sliding_window": 4, "layer_types": ("full_attention", "local", "full_attention")},
        r"has \['local'\]; allowed: \('full_attention', 'sliding_attention'\)",
    ),
    "no window": ({"layer_types": ALTERNATING}, "has sliding layers but no sliding_window"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_window_configs(case):
    overrides, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
@torch.no_grad()
def test_sliding_window_checkpoints_match_transformers(tmp_path, family):
    if family == "mistral":
        config = transformers.MistralConfig(**tiny_hf().config.to_dict())
        config.sliding_window, config.model_type = 5, "mistral"
        hf = transformers.MistralForCausalLM(config)
        hf.load_state_dict(tiny_hf().state_dict())
    else:  # layer 0 global, layer 1 windowed
        hf = tiny_hf("qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=1)
    hf.config._attn_implementation = "eager"
    hf.eval().save_pretrained(tmp_path, safe_serialization=True)
    config = read_config(tmp_path)
    expected = ("sliding_attention",) * 2 if family == "mistral" else ALTERNATING[1:]
    assert (config.sliding_window, tuple(map(config.window_of, (0, 1)))) == (
        5,
        tuple(5 if t == "sliding_attention" else None for t in expected),
    )
    model = attnkit_model(config, read_weights(tmp_path))
    assert max_logit_diff(model, hf) <= 1e-5  # 40 tokens: far past the window of 5
    tokens = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4))
    out, _ = decode(model, tokens, [7, 1, 1, 12, 19], max_new_per_step=12)
    assert (out - model(tokens)).abs().max() < 1e-4
