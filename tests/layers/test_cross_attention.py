"""Attention(cross=True): decoder queries over encoder K/V, against a float64 hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from attn_testing import NOISE_FLOOR, max_err
from attnkit.cache.encoder import EncoderCache
from attnkit.layers.attention import Attention, AttentionContext

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, MEMORY_HIDDEN = 9, 3, 59, 48, 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only spins (70x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cross_layer(seed: int = 0, memory_hidden: int | None = MEMORY_HIDDEN, **kwargs) -> Attention:
    torch.manual_seed(seed)
    layer = Attention(
        0, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, cross=True, memory_hidden=memory_hidden, **kwargs
    )
    return layer.double()


def ctx_for(memory=None, lengths=None, cache=None) -> AttentionContext:
    """A context for cross-attention: the RoPE angles and the causal mask must not matter."""
    angles = torch.full((1, HEAD_DIM // 2), 0.3, dtype=torch.float64)
    return AttentionContext(
        angles.cos(),
        angles.sin(),
        None,
        None,
        False,
        memory=memory,
        memory_lengths=lengths,
        cross_cache=cache,
    )


def reference(layer: Attention, x, memory, lengths) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) v by hand in x's dtype; padded keys get weight exactly 0."""
    dt = x.dtype
    w = {name: getattr(layer, name).weight.detach().to(dt) for name in ("wq", "wk", "wv", "wo")}
    b, t, _ = x.shape
    s = memory.shape[1]
    q = (x @ w["wq"].T).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
    real = torch.arange(s) < lengths.view(-1, 1)  # (b, s)
    memory = memory.masked_fill(~real.unsqueeze(-1), 0.0)  # NaN there must never matter
    k = (memory @ w["wk"].T).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = (memory @ w["wv"].T).view(b, s, KV_HEADS, HEAD_DIM).transpose(1, 2)
    k = k.repeat_interleave(HEADS // KV_HEADS, dim=1)  # query head i uses KV head i // group
    v = v.repeat_interleave(HEADS // KV_HEADS, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    scores = scores.masked_fill(~real.view(b, 1, 1, s), -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a source with no tokens: zeros
    out = (probs @ v).transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM)
    return out @ w["wo"].T


def inputs(src: int, tgt: int, lengths: list[int], seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    x = torch.randn(b, tgt, HIDDEN, generator=gen, dtype=torch.float64)
    memory = torch.randn(b, src, MEMORY_HIDDEN, generator=gen, dtype=torch.float64)
    lengths_t = torch.tensor(lengths)
    padded = torch.arange(src) >= lengths_t.view(-1, 1)
    memory[padded] = math.nan  # padded encoder positions: NaN must not leak
    return x, memory, lengths_t


CASES = [  # (src, tgt, lengths per row)
    (7, 1, [7, 7]),
    (7, 5, [7, 3, 1]),
    (97, 1, [97, 60]),
    (97, 5, [97, 13, 96]),
    (7, 9, [5, 0]),  # more queries than keys; a row with an empty source
]


@pytest.mark.parametrize("src,tgt,lengths", CASES, ids=str)
@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
@torch.no_grad()
def test_cross_attention_equals_the_hand_reference_with_padding(src, tgt, lengths, backend):
    layer = cross_layer(backend=backend)
    x, memory, lengths_t = inputs(src, tgt, lengths)
    want = reference(layer, x, memory, lengths_t)
    got = layer(x, ctx_for(memory, lengths_t))
    assert not got.isnan().any()
    assert max_err(got, want) < 1e-12  # float64 throughout: only summation order differs

    # float32: error vs the float64 reference at most 2x plain float32 PyTorch's (+ noise)
    layer32 = layer.float()
    got32 = layer32(x.float(), ctx_for(memory.float(), lengths_t))
    plain32 = reference(layer32, x.float(), memory.float(), lengths_t)
    err, plain_err = max_err(got32, want), max_err(plain32, want)
    assert err <= 2 * plain_err + NOISE_FLOOR[torch.float32], (err, plain_err)


@pytest.mark.parametrize("src,tgt,lengths", CASES, ids=str)
@torch.no_grad()
def test_the_encoder_cache_path_equals_projecting_the_memory(src, tgt, lengths):
    layer = cross_layer()
    x, memory, lengths_t = inputs(src, tgt, lengths)
    want = layer(x, ctx_for(memory, lengths_t))
    cache = layer.new_cache(1, max_seqs=len(lengths), dtype=torch.float64)
    seqs = [cache.add_sequence() for _ in lengths]
    cache.select(seqs)
    first = layer(x, ctx_for(memory, lengths_t, cache))  # stores K/V
    later = layer(x, ctx_for(None, None, cache))  # reads them, memory no longer needed
    # float64; the cached K/V are strided views, and the decode kernel tiles a layout whose
    # heads lie side by side in 16 tokens, one head at a time in 32: only rounding: 1e-12
    assert max_err(first, want) < 1e-12 and max_err(later, want) < 1e-12
    assert [cache.length(s) for s in seqs] == lengths


@torch.no_grad()
def test_no_causal_mask_applies_every_query_sees_the_whole_source():
    # 2 queries over 7 keys: bottom-right causal alignment would hide key 6 from query 0.
    layer = cross_layer()
    x, memory, _ = inputs(7, 2, [7])
    base = layer(x, ctx_for(memory))
    changed = memory.clone()
    changed[:, -1] += 1.0
    assert (layer(x, ctx_for(changed))[:, 0] - base[:, 0]).abs().max() > 1e-3


@torch.no_grad()
def test_no_positions_permuting_the_source_leaves_the_output_unchanged():
    layer = cross_layer()
    x, memory, lengths = inputs(7, 5, [7, 4])
    perm = torch.tensor([3, 0, 2, 1, 6, 5, 4])  # real tokens of row 1 are the first 4
    shuffled = memory.clone()
    shuffled[0] = memory[0, perm]
    shuffled[1, :4] = memory[1, perm[[1, 3, 2, 0]]]  # permutes row 1's 4 real tokens
    assert max_err(layer(x, ctx_for(shuffled, lengths)), layer(x, ctx_for(memory, lengths))) < 1e-12


@torch.no_grad()
def test_query_rows_are_independent_of_each_other():
    layer = cross_layer()
    x, memory, lengths = inputs(7, 5, [7, 4])
    base = layer(x, ctx_for(memory, lengths))
    changed = x.clone()
    changed[:, 2] = -changed[:, 2]
    out = layer(changed, ctx_for(memory, lengths))
    keep = [0, 1, 3, 4]
    assert max_err(out[:, keep], base[:, keep]) == 0 and max_err(out[:, 2], base[:, 2]) > 1e-3


def test_gradients_flow_to_every_projection_and_not_through_padding():
    layer = cross_layer()
    x, memory, lengths = inputs(7, 3, [7, 4])
    memory = memory.nan_to_num(0.0).requires_grad_()
    layer(x, ctx_for(memory, lengths)).square().sum().backward()
    for name in ("wq", "wk", "wv", "wo"):
        assert getattr(layer, name).weight.grad.abs().sum() > 0, name
    assert memory.grad[1, 4:].abs().max() == 0 and memory.grad[1, :4].abs().max() > 0


def test_all_sources_empty_gives_zeros_even_with_nan_memory_and_gradients_on():
    layer = cross_layer()  # weights require grad, so attention keeps its result in the graph
    x, memory, lengths = inputs(7, 3, [0, 0])
    cache = layer.new_cache(1, max_seqs=2, dtype=torch.float64)
    cache.select([cache.add_sequence(), cache.add_sequence()])
    for ctx in (ctx_for(memory, lengths), ctx_for(memory, lengths, cache)):
        out = layer(x, ctx)
        assert not out.isnan().any() and out.abs().max() == 0  # wo has no bias


def test_cross_layers_get_an_encoder_cache():
    cache = cross_layer().new_cache(2, max_seqs=3, dtype=torch.float64, initial_len=8)
    assert isinstance(cache, EncoderCache)
    assert (cache.n_layers, cache.kv_heads, cache.head_dim, cache.max_seqs) == (2, 3, 59, 3)
    assert cross_layer().cache_kind != Attention(0, HIDDEN, HEADS, KV_HEADS, HEAD_DIM).cache_kind


# -- bad input ------------------------------------------------------------------------------
@torch.no_grad()
def test_cross_mode_without_memory_or_cache_raises():
    x, _, _ = inputs(7, 2, [7])
    with pytest.raises(ValueError, match=r"cross-attention layer 0 needs ctx.memory"):
        cross_layer()(x, ctx_for(None))
    cache = EncoderCache(1, KV_HEADS, HEAD_DIM, dtype=torch.float64)
    cache.select([cache.add_sequence()])  # selected, but nothing stored yet
    with pytest.raises(ValueError, match=r"needs ctx.memory"):
        cross_layer()(x, ctx_for(None, None, cache))


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, 7, 48), r"memory_hidden=40\), got \(1, 7, 48\)"),  # the decoder's width, not 40
        ((2, 7, 40), r"batch=1"),
        ((7, 40), r"\(batch=1, src_len, memory_hidden=40\), got \(7, 40\)"),
    ],
    ids=["hidden", "batch", "rank"],
)
@torch.no_grad()
def test_memory_of_the_wrong_shape_raises(shape, match):
    x, _, _ = inputs(7, 2, [7])
    with pytest.raises(ValueError, match=match):
        cross_layer()(x, ctx_for(torch.zeros(shape, dtype=torch.float64)))


@torch.no_grad()
def test_memory_of_another_dtype_raises():
    x, memory, _ = inputs(7, 2, [7])
    with pytest.raises(
        TypeError,
        match=r"ctx.memory has dtype torch.float32 but the layer's weights are torch.float64",
    ):
        cross_layer()(x, ctx_for(memory.float()))


@pytest.mark.parametrize(
    "lengths,error,match",
    [
        (torch.tensor([8]), ValueError, r"in \[0, 7\], got \[8\]"),
        (torch.tensor([-1]), ValueError, r"in \[0, 7\], got \[-1\]"),
        (torch.tensor([3, 3]), ValueError, r"shape \(1,\), one per row, got \(2,\)"),
        (torch.tensor([3.0]), TypeError, r"integer tensor, got torch.float32"),
        ([3], TypeError, r"integer tensor, got list"),
    ],
    ids=["long", "negative", "shape", "float", "list"],
)
@torch.no_grad()
def test_bad_memory_lengths_raise(lengths, error, match):
    x, memory, _ = inputs(7, 2, [7])
    with pytest.raises(error, match=match):
        cross_layer()(x, ctx_for(memory, lengths))


@torch.no_grad()
def test_a_cache_selected_for_another_batch_raises():
    layer = cross_layer()
    x, memory, lengths = inputs(7, 2, [7, 5])
    cache = layer.new_cache(1, max_seqs=2, dtype=torch.float64)
    cache.select([cache.add_sequence(), cache.add_sequence()])
    layer(x, ctx_for(memory, lengths, cache))
    with pytest.raises(ValueError, match=r"x has batch 1 but the cross cache selected 2"):
        layer(x[:1], ctx_for(None, None, cache))


def test_bad_constructor_arguments_raise():
    with pytest.raises(TypeError, match=r"cross must be a bool, got str"):
        Attention(0, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, cross="yes")
    with pytest.raises(ValueError, match=r"memory_hidden=40 is only for cross=True"):
        Attention(0, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, memory_hidden=40)
    with pytest.raises(ValueError, match=r"memory_hidden must be an integer >= 1, got 0"):
        Attention(0, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, cross=True, memory_hidden=0)
    with pytest.raises(ValueError, match=r"cross-attention layer sees the whole source"):
        Attention(0, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, cross=True, window=4)
