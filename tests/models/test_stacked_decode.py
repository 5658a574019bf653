"""A decode step through every block in one C++ call (models/stacked_decode.py): taken when
it qualifies, equal to the blocks run one by one, rebuilt when the model changes, declined
(block by block, as before) when it cannot serve the step.

Tolerances: the stacked float32 logits against the float64 model obey the 2x rule (at most
twice the error of the float32 blocks one by one, plus 1e-5); two float32 paths on the same
weights agree within 1e-4 (logits of magnitude ~1).
"""

from __future__ import annotations

import copy
import dataclasses
import io

import pytest
import torch

from attn_testing import tiny_transformer
from attnkit.cache import (
    ContiguousCache,
    QuantizedCache,
    SlidingWindowCache,
    StreamingLLMCache,
)
from attnkit.cache.eviction import H2OCache
from attnkit.cache.latent import LatentCache
from attnkit.cache.layered import LayeredCache
from attnkit.cache.paged import PagedCache
from attnkit.layers.latent import LatentAttention
from attnkit.models.convert.mla import to_mla
from attnkit.models.llama import Block
from attnkit.models.stacked_decode import StackedDecode
from attnkit.ops.decode_block import DecodeStack, LatentDecodeStack

PROMPTS = (5, 9, 2)  # ragged: the decode kernel reads a length per sequence
STEPS = 6
RING_SLACK = {"max_new_per_step": 9}  # the longest prompt; rings wrap while decoding


def count_steps(monkeypatch, stack_type) -> list[int]:
    """The batch size of every step that runs through a `stack_type` from now on."""
    calls, run = [], stack_type.__call__

    def counted(stack, x, *args, **kwargs):
        calls.append(x.shape[0])
        return run(stack, x, *args, **kwargs)

    monkeypatch.setattr(stack_type, "__call__", counted)
    return calls


@pytest.fixture
def stack_calls(monkeypatch) -> list[int]:
    """The batch size of every step that ran through a DecodeStack."""
    return count_steps(monkeypatch, DecodeStack)


def new_cache(model, kind: str):
    if kind == "contiguous":  # grows while decoding; a ring for a windowed model
        ring = model.config.sliding_window is not None
        return model.new_cache(len(PROMPTS), **(RING_SLACK if ring else {"initial_len": 8}))
    c = model.config
    shape = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    dtype = next(model.parameters()).dtype
    if kind == "window":  # full-attention layers, a cache that keeps 4 keys of each
        cache = SlidingWindowCache(*shape, window=4, max_seqs=3, dtype=dtype, **RING_SLACK)
    elif kind == "sinks":  # 2 sink keys and 3 recent ones besides the new token
        cache = StreamingLLMCache(*shape, budget=5, sinks=2, max_seqs=3, dtype=dtype, **RING_SLACK)
    elif kind == "full":  # every key, whatever the layers' window
        cache = ContiguousCache(*shape, max_seqs=3, dtype=dtype)
    elif kind == "paged-layered":  # a pool per kind of layer (mixed windowed and global)
        cache = model.new_paged_cache(24, 4, seed=1)
    else:  # "paged"; "paged-window" and "paged-sinks" give back blocks behind their window
        window = {"paged-window": dict(window=4), "paged-sinks": dict(window=4, sinks=2)}
        cache = PagedCache(
            *shape, num_blocks=24, block_size=4, dtype=dtype, seed=1, **window.get(kind, {})
        )
    if kind in ("window", "sinks", "full") or kind.startswith("paged"):  # empty: fill them
        for _ in PROMPTS:
            cache.add_sequence()
    return cache


def block_by_block(model):
    model._stacked_decode = lambda *args: None
    return model


@torch.no_grad()
def decode(model, kind: str, steps: int = STEPS, seed: int = 0, tokens_out=None):
    """Logits (batch, steps, vocab) of `steps` decode steps on fixed random tokens, each
    prompt prefilled alone first; and the cache. `tokens_out` gets each sequence's tokens."""
    gen = torch.Generator().manual_seed(seed)
    cache = new_cache(model, kind)
    prompts = [torch.randint(0, 101, (1, n), generator=gen) for n in PROMPTS]
    for seq, prompt in zip(cache.sequences, prompts, strict=True):
        model(prompt, cache=cache, seq_ids=[seq])
    tokens = torch.randint(0, 101, (len(PROMPTS), steps), generator=gen)
    out = [model(tokens[:, i : i + 1], cache=cache) for i in range(steps)]
    if tokens_out is not None:
        tokens_out += [p[0].tolist() + t.tolist() for p, t in zip(prompts, tokens, strict=True)]
    return torch.cat(out, dim=1), cache


@pytest.mark.parametrize("kind", ["contiguous", "paged"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_stacked_steps_match_the_float64_model(kind, interleaved, stack_calls):
    overrides = {"rope_interleaved": interleaved, "attention_bias": True}
    want, _ = decode(tiny_transformer(5, **overrides), kind)
    stack_calls.clear()
    got, _ = decode(tiny_transformer(5, **overrides).float(), kind)
    assert stack_calls == [len(PROMPTS)] * STEPS  # every decode step, no prefill
    plain, _ = decode(block_by_block(tiny_transformer(5, **overrides).float()), kind)
    err, plain_err = ((t.double() - want).abs().max().item() for t in (got, plain))
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("window", {}),  # the cache's window over full-attention layers (compare's rows)
        ("sinks", {"attention_bias": True}),
        ("contiguous", {"sliding_window": 3}),  # windowed layers and their own ring
    ],
)
def test_ring_buffer_steps_match_the_float64_model(kind, overrides, stack_calls):
    # The ring's table lists sinks and window keys out of slot order after it wraps
    # (prompts of 9 tokens in rings of 4 + 9 slots, 6 steps on).
    want, _ = decode(tiny_transformer(16, **overrides), kind)
    stack_calls.clear()
    got, _ = decode(tiny_transformer(16, **overrides).float(), kind)
    assert stack_calls == [len(PROMPTS)] * STEPS
    plain, _ = decode(block_by_block(tiny_transformer(16, **overrides).float()), kind)
    err, plain_err = ((t.double() - want).abs().max().item() for t in (got, plain))
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("full", {"sliding_window": 4}),  # windowed layers over every key: the stack's window
        ("paged", {"sliding_window": 4}),
        ("paged-window", {"sliding_window": 4}),  # blocks behind the window given back
        ("paged-window", {"sliding_window": 3}),  # layers narrower than the cache
        ("paged-window", {}),  # the cache's window over full-attention layers, as a ring's
        ("paged-sinks", {}),
    ],
)
def test_windows_over_full_and_paged_caches_match_the_float64_model(kind, overrides, stack_calls):
    want, _ = decode(tiny_transformer(17, **overrides), kind)
    stack_calls.clear()
    got, cache = decode(tiny_transformer(17, **overrides).float(), kind)
    assert stack_calls == [len(PROMPTS)] * STEPS
    plain, _ = decode(block_by_block(tiny_transformer(17, **overrides).float()), kind)
    err, plain_err = ((t.double() - want).abs().max().item() for t in (got, plain))
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)
    if kind.startswith("paged-"):  # 9 + 6 tokens in blocks of 4, a window of 4: 2 given
        given_back = 1 if kind == "paged-sinks" else 2  # back, but not the sinks' block
        assert cache.block_table(cache.sequences[1]).count(-1) == given_back


@pytest.mark.parametrize("kind", ["contiguous", "paged-layered"])  # ring + K/V; two pools
@pytest.mark.parametrize(
    ("layer_types", "runs"),
    [
        (("sliding_attention", "full_attention", "sliding_attention"), 3),
        (("sliding_attention", "sliding_attention", "full_attention"), 2),
    ],
    ids=["alternating", "two-then-one"],
)
def test_a_model_mixing_windowed_and_global_layers_runs_a_call_per_run_of_layers(
    kind, layer_types, runs, stack_calls
):
    # A LayeredCache lends a storage per group: one stack call per run of consecutive
    # layers of one group, each run over its own storage and window.
    overrides = {"sliding_window": 3, "layer_types": layer_types}
    want, _ = decode(tiny_transformer(19, **overrides), kind)
    stack_calls.clear()
    got, cache = decode(tiny_transformer(19, **overrides).float(), kind)
    assert isinstance(cache, LayeredCache)
    assert stack_calls == [len(PROMPTS)] * (STEPS * runs)
    plain, _ = decode(block_by_block(tiny_transformer(19, **overrides).float()), kind)
    err, plain_err = ((t.double() - want).abs().max().item() for t in (got, plain))
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


@pytest.mark.parametrize("middle", ["contiguous", "h2o"])
def test_a_layered_cache_with_a_group_that_lends_no_storage_runs_block_by_block(
    middle, stack_calls
):
    model = tiny_transformer(19).float()
    c = model.config
    shape = (c.num_key_value_heads, c.head_dim)
    if middle == "h2o":  # needs each step's attention weights: lends no storage
        group = H2OCache(1, *shape, budget=6, recent=2, max_seqs=3)
    else:
        group = ContiguousCache(1, *shape, max_seqs=3)
    cache = LayeredCache([([0, 2], ContiguousCache(2, *shape, max_seqs=3)), ([1], group)])
    for n in PROMPTS:
        model(torch.arange(n).view(1, -1), cache=cache, seq_ids=[cache.add_sequence()])
    stack_calls.clear()
    with torch.no_grad():
        model(torch.zeros(len(PROMPTS), 1, dtype=torch.long), cache=cache)
    assert stack_calls == ([] if middle == "h2o" else [len(PROMPTS)] * 3)


def test_a_latent_group_of_matching_widths_is_never_written_by_the_gqa_stack(stack_calls):
    # One KV head of 6 dims against a latent of 6 plus a RoPE key of 6: the storages'
    # shapes match, but the layers must say the cache is of the other kind, not decode.
    model = tiny_transformer(3, num_key_value_heads=1).float()
    cache = LayeredCache(
        [([0, 2], ContiguousCache(2, 1, 6, max_seqs=2)), ([1], LatentCache(1, 6, 6, max_seqs=2))]
    )
    for _ in range(2):
        cache.add_sequence()
    with torch.no_grad(), pytest.raises(ValueError, match="latent must have shape"):
        model(torch.tensor([[3], [4]]), cache=cache)
    assert not stack_calls


@pytest.mark.parametrize(("paged", "ring"), [("paged-window", "window"), ("paged-sinks", "sinks")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_a_paged_cache_with_a_window_equals_the_ring_buffer(paged, ring, dtype):
    # Full-attention layers see the cache's window either way: the ring keeps only it, the
    # pool gives back the blocks behind it. float64 runs block by block (decode through
    # paged_decode's kernel), float32 through the stack.
    model = tiny_transformer(18).to(dtype)
    got, _ = decode(model, paged)
    want, _ = decode(model, ring)
    assert (got - want).abs().max() < (1e-12 if dtype == torch.float64 else 1e-4)


def test_the_stack_follows_changes_to_the_model(stack_calls):
    # Whatever the stack copied (packed weights, epsilons) must follow the model: weights
    # written in place, a parameter replaced, a norm's eps changed. Each change is made to
    # a twin that runs block by block; both must agree, and differ from before the change.
    model = tiny_transformer(8).float()
    twin = block_by_block(copy.deepcopy(model))
    before, _ = decode(model, "contiguous")

    def replace_wq(m):
        m.blocks[2].attn.wq.weight = torch.nn.Parameter(-m.blocks[2].attn.wq.weight)

    changes = [
        lambda m: m.blocks[1].mlp.up.weight.mul_(1.5),
        replace_wq,
        lambda m: setattr(m.blocks[0].mlp_norm, "eps", 10.0),
    ]
    for change in changes:
        with torch.no_grad():
            change(model)
            change(twin)
        stack_calls.clear()
        got, _ = decode(model, "contiguous")
        assert len(stack_calls) == STEPS
        want, _ = decode(twin, "contiguous")
        assert (got - want).abs().max() < 1e-4
        assert (got - before).abs().max() > 1e-2  # the change mattered
        before = got


def test_hooks_gradients_and_other_layers_run_block_by_block(stack_calls):
    model = tiny_transformer(9).float()
    seen = []
    handle = model.blocks[2].mlp.register_forward_hook(lambda m, a, out: seen.append(1))
    decode(model, "contiguous")
    assert not stack_calls and len(seen) == len(PROMPTS) + STEPS  # the hook saw every step
    handle.remove()
    decode(model, "contiguous")
    assert len(stack_calls) == STEPS  # and without it, the stack again

    stack_calls.clear()
    cache = model.new_cache(1)
    model(torch.tensor([[1, 2]]), cache=cache)
    logits = model(torch.tensor([[3]]), cache=cache)  # gradients recorded: not the stack
    assert logits.requires_grad and not stack_calls

    model.blocks[1].attn.backend = "reference"  # a named backend: attention as asked
    decode(model, "contiguous")
    assert not stack_calls
    c = model.config
    shape = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    int8 = QuantizedCache(*shape, max_seqs=2, scale_dtype=torch.float16)  # no kernel for those
    narrow = SlidingWindowCache(*shape, window=3, max_seqs=2)  # a ring narrower than the layers'
    with torch.no_grad():
        for model, cache in (
            (tiny_transformer(9).float(), int8),
            (tiny_transformer(9, sliding_window=4).float(), narrow),
        ):
            for _ in range(2):
                cache.add_sequence()
            model(torch.tensor([[1, 2], [3, 4]]), cache=cache)
            want = block_by_block(copy.deepcopy(model))(
                torch.tensor([[5], [6]]), cache=copy.deepcopy(cache)
            )
            got = model(torch.tensor([[5], [6]]), cache=cache)
            assert not stack_calls and torch.equal(got, want)


def test_stacked_steps_index_the_blocks_they_fill_for_prefix_sharing(stack_calls):
    # A paged step's full blocks join the prefix index once every layer holds their K/V:
    # the stack writes all layers at once and must say so.
    model, tokens = tiny_transformer(10).float(), []
    _, cache = decode(model, "paged", steps=7, tokens_out=tokens)  # 12, 16 and 9 tokens
    assert len(stack_calls) == 7
    for seq, length in zip(cache.sequences[:3], (12, 16, 9), strict=True):
        assert len(tokens[seq]) == length
        reused = cache.length(cache.add_sequence(token_ids=tokens[seq]))
        assert reused == (length - 1) // 4 * 4  # whole blocks, one token left to compute


def test_a_copied_or_pickled_model_decodes_as_the_original(stack_calls):
    model = tiny_transformer(11).float()
    want, _ = decode(model, "paged")  # builds the stack
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        stack_calls.clear()
        got, _ = decode(twin, "paged")
        assert len(stack_calls) == STEPS and torch.equal(got, want)


class DoubledMLP(Block):
    """A block subclass with its own forward: the stack must not run Block's in its place."""

    def forward(self, x, ctx):
        x = x + self.attn(self.attn_norm(x), ctx)
        return x + 2 * self.mlp(self.mlp_norm(x))


def test_a_block_subclass_with_its_own_forward_runs_as_written(stack_calls):
    model = tiny_transformer(12).float()
    twin = copy.deepcopy(model)
    for m in (model, twin):
        for block in m.blocks:
            block.__class__ = DoubledMLP
    got, _ = decode(model, "contiguous")
    assert not stack_calls
    want, _ = decode(block_by_block(twin), "contiguous")
    assert torch.equal(got, want)


def test_a_custom_block_without_an_mlp_declines_instead_of_failing(stack_calls):
    class Attending(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.attn, self.attn_norm = block.attn, block.attn_norm

        def forward(self, x, ctx):
            return x + self.attn(self.attn_norm(x), ctx)

    model = tiny_transformer(13).float()
    model.blocks = torch.nn.ModuleList(Attending(b) for b in model.blocks)
    logits, _ = decode(model, "paged")
    assert not stack_calls and torch.isfinite(logits).all()


def test_a_new_rope_layout_or_head_shape_rebuilds_the_stack(stack_calls):
    # The stack bakes in the RoPE layout and the head shape; a config swapped for one with
    # the other layout must give that layout's logits, not the stale stack's.
    model = tiny_transformer(14).float()
    decode(model, "contiguous")  # built for the half-split layout
    model.config = dataclasses.replace(model.config, rope_interleaved=True)
    stack_calls.clear()
    got, _ = decode(model, "contiguous")
    assert len(stack_calls) == STEPS
    twin = block_by_block(copy.deepcopy(model))
    want, _ = decode(twin, "contiguous")
    assert (got - want).abs().max() < 1e-4


def test_weights_replaced_through_data_rebuild_the_stack_even_at_the_same_address(stack_calls):
    # `p.data = new` keeps the parameter's id and version; only the data pointer tells.
    # The stack holds the old data, so the new tensor can never take the old address.
    model = tiny_transformer(15).float()
    twin = block_by_block(copy.deepcopy(model))
    for trial in range(5):
        before, _ = decode(model, "contiguous")
        with torch.no_grad():
            for m in (model, twin):
                p = m.blocks[0].mlp.down.weight
                p.data = p.data * -3  # the old tensor is freed here unless something holds it
                p.data = p.data * 3  # and this one may take its address
        got, _ = decode(model, "contiguous")
        want, _ = decode(twin, "contiguous")
        assert (got - want).abs().max() < 1e-4, trial
        assert (got - before).abs().max() > 1e-2


def test_int8_cache_steps_quantize_and_count_error_as_the_cache_does(stack_calls):
    # The stack quantizes each new row in C++ as `quantize` does and reads int8 rows with
    # their scales: the same storage, the same error statistics and, up to float32
    # rounding, the same logits as the blocks one by one through QuantizedCache.
    def run(model):
        c = model.config
        cache = QuantizedCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max_seqs=3, initial_len=8
        )
        for _ in PROMPTS:
            cache.add_sequence()
        gen = torch.Generator().manual_seed(3)
        for seq, n in zip(cache.sequences, PROMPTS, strict=True):
            model(torch.randint(0, 101, (1, n), generator=gen), cache=cache, seq_ids=[seq])
        tokens = torch.randint(0, 101, (len(PROMPTS), STEPS), generator=gen)
        logits = [model(tokens[:, i : i + 1], cache=cache) for i in range(STEPS)]
        return torch.cat(logits, dim=1), cache

    with torch.no_grad():
        got, stacked = run(tiny_transformer(17, attention_bias=True).float())
        assert stack_calls == [len(PROMPTS)] * STEPS
        want, alone = run(block_by_block(tiny_transformer(17, attention_bias=True).float()))
    assert (got - want).abs().max() < 1e-5
    for name in ("k", "v", "k_scale", "v_scale"):
        assert torch.equal(getattr(stacked, name), getattr(alone, name)), name
    e, f = stacked.quantization_error, alone.quantization_error
    assert e.max_abs == f.max_abs and e.max_rel == f.max_rel and 0 < e.max_rel <= 1 / 254
    assert e.mean_rel == pytest.approx(f.mean_rel, rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), 1e38], ids=["nan", "inf"])
def test_a_non_finite_int8_row_is_stored_and_counted_as_quantize_does(bad, stack_calls):
    # The C++ quantizer once dropped a NaN from the row's absmax (a finite scale, NaN
    # stored as garbage, finite logits where the cache gives NaN) and from the error.
    def run(model):
        c = model.config
        cache = QuantizedCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
        cache.add_sequence()
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]), cache=cache)  # a clean prefill, then a bad K row
            model.blocks[2].attn.wk.weight[0, :] = bad
            return model(torch.tensor([[4]]), cache=cache), cache

    got, stacked = run(tiny_transformer(18).float())
    assert stack_calls == [1]
    want, alone = run(block_by_block(tiny_transformer(18).float()))
    assert torch.equal(got.isfinite(), want.isfinite())
    for name in ("k", "v", "k_scale", "v_scale"):
        a, b = getattr(stacked, name), getattr(alone, name)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    e, f = stacked.quantization_error, alone.quantization_error
    assert str(e.max_abs) == str(f.max_abs) and str(e.max_rel) == str(f.max_rel)


def test_a_model_pickled_before_the_stack_knew_its_block_class_still_loads(stack_calls):
    model = tiny_transformer(19).float()
    want, _ = decode(model, "contiguous")
    state = StackedDecode.__getstate__
    try:
        StackedDecode.__getstate__ = lambda self: {}  # what sessions before this one wrote
        buffer = io.BytesIO()
        torch.save(model, buffer)
    finally:
        StackedDecode.__getstate__ = state
    buffer.seek(0)
    stack_calls.clear()
    got, _ = decode(torch.load(buffer, weights_only=False), "contiguous")
    assert len(stack_calls) == STEPS and torch.equal(got, want)


@pytest.fixture
def latent_calls(monkeypatch) -> list[int]:
    """The batch size of every step that ran through a LatentDecodeStack."""
    return count_steps(monkeypatch, LatentDecodeStack)


def mla_model(rope_heads=1, rope_pairs=None, q_rank=None, **overrides):
    """A tiny MLA Transformer (head_dim 6: three angle columns for the RoPE dims' pairs);
    its layers keep 4, 5, 6 no-RoPE dims (as `to_mla`'s layers may differ)."""

    def latent(cfg, i):
        return LatentAttention(
            i, cfg.hidden_size, cfg.num_attention_heads, kv_rank=10, rope_dim=6, nope_dim=4 + i,
            v_head_dim=4, rope_heads=rope_heads, rope_pairs=rope_pairs, q_rank=q_rank,
            qkv_bias=True, out_bias=True,
        )  # fmt: skip

    return tiny_transformer(21, attention=latent, **overrides)


@pytest.mark.parametrize(
    ("rope_heads", "rope_pairs", "interleaved"),
    [(1, None, False), (3, (2, 0, 2), True)],  # a shared RoPE key; one per KV head, gathered
)
def test_mla_steps_match_the_float64_model(rope_heads, rope_pairs, interleaved, latent_calls):
    def build():
        return mla_model(rope_heads, rope_pairs, rope_interleaved=interleaved)

    want, _ = decode(build(), "contiguous")
    latent_calls.clear()
    got, cache = decode(build().float(), "contiguous")
    assert isinstance(cache, LatentCache) and cache.capacity > 8  # grew (at the 9-token prompt)
    assert latent_calls == [len(PROMPTS)] * STEPS
    plain, _ = decode(block_by_block(build().float()), "contiguous")
    err, plain_err = ((t.double() - want).abs().max().item() for t in (got, plain))
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


def test_a_converted_mla_model_decodes_through_the_stack(latent_calls):
    """to_mla's layers (no latent norm, RoPE pairs picked by the conversion) at float32."""
    model = to_mla(tiny_transformer(5), 7, rope_dim=4, calibration=torch.arange(40).view(1, -1))
    want, _ = decode(model, "contiguous")
    got, _ = decode(copy.deepcopy(model).float(), "contiguous")
    assert latent_calls == [len(PROMPTS)] * STEPS
    assert (got.double() - want).abs().max().item() < 1e-4


def test_an_mla_stack_asked_for_a_window_says_it_attends_every_key(latent_calls):
    model = to_mla(tiny_transformer(5), 7, rope_dim=4, calibration=torch.arange(40).view(1, -1))
    _, cache = decode(model.float(), "contiguous", steps=1)
    stack = model._stacked_decode._plan.whole
    assert isinstance(stack, LatentDecodeStack)
    x = torch.zeros(len(PROMPTS), 1, model.config.hidden_size)
    with pytest.raises(ValueError, match=r"attends every key, got window=\(4, 0\)"):
        stack(x, cache.decode_storage(), None, None, window=(4, 0))


def test_mla_layers_the_stack_does_not_serve_run_block_by_block(latent_calls):
    with_query_latent = mla_model(q_rank=8).float()
    naive = mla_model().float()
    for block in naive.blocks:
        block.attn.mode = "naive"  # asked for explicitly: the per-head K/V path
    for model in (with_query_latent, naive):
        want, _ = decode(block_by_block(copy.deepcopy(model)), "contiguous")
        got, _ = decode(model, "contiguous")
        assert latent_calls == []
        assert torch.equal(got, want)
    for block in naive.blocks:  # back to auto: the stack is built and taken
        block.attn.mode = "auto"
    decode(naive, "contiguous")
    assert latent_calls == [len(PROMPTS)] * STEPS


def test_an_mla_model_without_its_latent_norm_or_with_a_plain_cache(latent_calls):
    """`attn.kv_norm = None` (an ablation) leaves None among the layer's submodules; a
    plain ContiguousCache of the latent cache's widths is still refused, as the layers do."""
    model = mla_model().float()
    for block in model.blocks:
        block.attn.kv_norm = None
    want, _ = decode(block_by_block(copy.deepcopy(model)), "contiguous")
    got, _ = decode(model, "contiguous")
    assert latent_calls == [len(PROMPTS)] * STEPS
    assert (got - want).abs().max().item() < 1e-4
    plain = ContiguousCache(3, 1, 10, v_head_dim=6, max_seqs=1)
    with torch.no_grad():
        plain.add_sequence()
        with pytest.raises(TypeError, match="caches latents in a LatentCache"):
            model(torch.tensor([[1]]), cache=plain)
