"""The fused decode-block calls (csrc/decode_block.cpp) equal the torch ops they replace.

Each call is checked against the same composition of torch ops in float64 (rms_norm,
F.linear, `apply_rotary`, silu), on fresh random inputs with awkward sizes. Tolerance: the
2x rule, the fused float32 error against float64 at most twice that of the plain float32
torch composition, plus a floor of 1e-5 or 8 float32 ulps at the scale of what the output
sums (`_within_2x`).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attnkit.layers.rope import apply_rotary
from attnkit.ops import decode_block
from attnkit.ops.cpp_build import load_kernel, unavailable_reason
from attnkit.ops.skinny_linear import MAX_ROWS


def test_the_kernel_builds_on_this_machine():
    # If this fails, every decode step silently takes the unfused torch path: say so here.
    assert load_kernel(decode_block.SOURCE) is not None, unavailable_reason(decode_block.SOURCE)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _within_2x(
    got: torch.Tensor,
    plain: torch.Tensor,
    want: torch.Tensor,
    magnitude: torch.Tensor | None = None,
) -> None:
    # Per element: twice the plain float32 error (its worst element) plus a floor of 1e-5
    # or 8 float32 ulps at the element's `magnitude`, the size of what it sums (default:
    # the output's scale). The plain error alone is no bound: with one intermediate unit it
    # is a single rounding that can land near 0 by luck (hypothesis found 8e-6 beside the
    # kernel's 5e-5 on outputs of 34).
    err = (got.double() - want).abs()
    plain_err = (plain.double() - want).abs().max().item() if want.numel() else 0.0
    if magnitude is None:
        magnitude = torch.full_like(want, want.abs().max().item() if want.numel() else 0.0)
    floor = (8 * torch.finfo(torch.float32).eps * magnitude).clamp(min=1e-5)
    bad = err > 2 * plain_err + floor
    assert not bad.any(), (err[bad].max().item(), plain_err, floor[bad].min().item())


def _inputs_reference(x, norm, eps, weights, biases, cos, sin, heads, head_dim, interleaved):
    """q, k, v by torch ops, in the dtype of the arguments (float64 for the oracle)."""
    b, t, _ = x.shape
    h = _norm(x, norm, eps)
    q, k, v = (F.linear(h, w, bias) for w, bias in zip(weights, biases, strict=True))
    n_heads, n_kv = heads
    q = q.view(b, t, n_heads, head_dim).transpose(1, 2)
    k = k.view(b, t, n_kv, head_dim).transpose(1, 2)
    v = v.view(b, t, n_kv, head_dim).transpose(1, 2)
    rotate = {"interleaved": interleaved}
    return apply_rotary(q, cos, sin, **rotate), apply_rotary(k, cos, sin, **rotate), v


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 6),
    seq=st.integers(1, 5),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    half=st.integers(1, 7),
    extra=st.integers(0, 5),  # head dims past the rotated ones (partial rotary)
    hidden=st.integers(1, 97),
    interleaved=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_inputs_match_torch_ops(
    batch, seq, kv_heads, group, half, extra, hidden, interleaved, with_bias, seed
):
    if batch * seq > MAX_ROWS:
        return
    gen = torch.Generator().manual_seed(seed)
    head_dim, n_heads = 2 * half + extra, kv_heads * group
    x = torch.randn(batch, seq, hidden, generator=gen)
    norm = torch.rand(hidden, generator=gen) + 0.5
    outs = (n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    weights = tuple(torch.randn(o, hidden, generator=gen) / hidden**0.5 for o in outs)
    biases = tuple(torch.randn(o, generator=gen) if with_bias else None for o in outs)
    angles = torch.rand(batch, seq, half, generator=gen) * 50  # each token its own position
    cos, sin = angles.cos(), angles.sin()
    eps = 1e-5
    args = (weights, biases, cos, sin, (n_heads, kv_heads), head_dim, interleaved)

    got = decode_block.attention_inputs(
        x,
        norm,
        eps,
        weights,
        biases,
        cos.reshape(-1, half),
        sin.reshape(-1, half),
        (n_heads, kv_heads),
        head_dim,
        interleaved,
    )
    plain = _inputs_reference(x, norm, eps, *args)
    double = [tuple(None if t is None else t.double() for t in group) for group in args[:2]]
    want = _inputs_reference(
        x.double(), norm.double(), eps, *double, cos.double(), sin.double(), *args[4:]
    )
    for got_i, plain_i, want_i in zip(got, plain, want, strict=True):
        assert got_i.shape == want_i.shape
        _within_2x(got_i, plain_i, want_i)


def _outputs_reference(x, attn, wo, bias_o, norm, eps, gate, up, down):
    y = x + F.linear(attn, wo, bias_o)
    n = _norm(y, norm, eps)
    return y + F.linear(F.silu(F.linear(n, gate)) * F.linear(n, up), down)


def _outputs_magnitude(x, attn, wo, bias_o, norm, eps, gate, up, down) -> torch.Tensor:
    """How large the float32 rounding of `_outputs_reference` can be, per element, in units
    of eps (float64 arguments): each sum's absolute terms, carried to the output to first
    order.
    A gate pre-activation g = gate·n rounds by ~eps·(|gate|·|n|), which silu(g)·u carries
    on with the factor |silu'(g)·u|; the residual sums and `down` add their own terms."""
    y = x + F.linear(attn, wo, bias_o)
    y_terms = x.abs() + F.linear(attn.abs(), wo.abs(), None if bias_o is None else bias_o.abs())
    n = _norm(y, norm, eps)
    g, u = F.linear(n, gate), F.linear(n, up)
    g_terms, u_terms = F.linear(n.abs(), gate.abs()), F.linear(n.abs(), up.abs())
    sig = torch.sigmoid(g)
    silu_slope = sig * (1 + g * (1 - sig))
    h_terms = (F.silu(g) * u).abs() + F.silu(g).abs() * u_terms + (silu_slope * u).abs() * g_terms
    return y_terms + F.linear(h_terms, down.abs())


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, MAX_ROWS),
    hidden=st.integers(1, 97),
    attn_width=st.integers(1, 70),
    intermediate=st.integers(1, 130),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(rows=1, hidden=46, attn_width=1, intermediate=1, with_bias=True, seed=0)  # a lucky plain
@example(rows=1, hidden=79, attn_width=1, intermediate=1, with_bias=True, seed=8415)  # and another
def test_block_outputs_match_torch_ops(rows, hidden, attn_width, intermediate, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, hidden, generator=gen)
    attn = torch.randn(rows, 1, attn_width, generator=gen)
    wo = torch.randn(hidden, attn_width, generator=gen) / attn_width**0.5
    bias_o = torch.randn(hidden, generator=gen) if with_bias else None
    norm = torch.rand(hidden, generator=gen) + 0.5
    # gate pre-activations of a few units up to |g| ~ 30: silu's both tails
    gate = torch.randn(intermediate, hidden, generator=gen) * 3
    up = torch.randn(intermediate, hidden, generator=gen) / hidden**0.5
    down = torch.randn(hidden, intermediate, generator=gen) / intermediate**0.5
    eps = 1e-5
    got = decode_block.block_outputs(x, attn, wo, bias_o, norm, eps, (gate, up, down))
    tensors = (x, attn, wo, bias_o, norm)
    plain = _outputs_reference(*tensors, eps, gate, up, down)
    double = [None if t is None else t.double() for t in (*tensors, gate, up, down)]
    want = _outputs_reference(*double[:5], eps, *double[5:])
    assert got.shape == x.shape
    _within_2x(got, plain, want, _outputs_magnitude(*double[:5], eps, *double[5:]))


def test_silu_tails_are_finite_and_exact_enough():
    # The fused silu must neither overflow (e^-x for very negative x) nor lose the linear
    # tail. With x = 0, attn = 1 and every weight 1, y = 1 and the normed row is 1, so
    # the block returns 1 + silu(gate weight): one call per gate value.
    one = torch.ones(1, 1)
    for value in (-1e30, -1e4, -100.0, -87.5, -86.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 1e4):
        gate = torch.full((1, 1), value)
        out = decode_block.block_outputs(
            torch.zeros(1, 1, 1), torch.ones(1, 1, 1), one, None, torch.ones(1), 0.0,
            (gate, one, one),
        )  # fmt: skip
        want = 1.0 + F.silu(torch.tensor(value, dtype=torch.float64)).item()
        assert torch.isfinite(out).all(), value
        assert abs(out.item() - want) <= 1e-6 * max(1.0, abs(want)), (value, out.item(), want)
    # non-finite gates propagate as torch's silu does: NaN and -inf give NaN, +inf gives +inf
    for value, check in ((float("nan"), math.isnan), (float("-inf"), math.isnan)):
        gate = torch.full((1, 1), value)
        out = decode_block.block_outputs(
            torch.zeros(1, 1, 1), torch.ones(1, 1, 1), one, None, torch.ones(1), 0.0,
            (gate, one, one),
        )  # fmt: skip
        assert check(out.item()) and check(F.silu(torch.tensor(value)).item()), value


def test_fusable_says_no_to_what_the_calls_do_not_serve():
    w = torch.randn(8, 8)
    x = torch.randn(2, 1, 8)
    assert decode_block.fusable(x, [w, None])
    assert not decode_block.fusable(x.double(), [w.double()])  # float32 only
    assert not decode_block.fusable(x, [w.double()])
    assert not decode_block.fusable(torch.randn(MAX_ROWS + 1, 1, 8), [w])  # too many rows
    assert not decode_block.fusable(torch.randn(4, MAX_ROWS // 4 + 1, 8), [w])
    trained = w.clone().requires_grad_()
    assert not decode_block.fusable(x, [trained])  # autograd wants a backward
    with torch.no_grad():
        assert decode_block.fusable(x, [trained])


def test_fusable_follows_the_packed_weights_switch(monkeypatch):
    monkeypatch.setenv("ATTNKIT_PACKED_WEIGHTS", "0")
    assert not decode_block.fusable(torch.randn(1, 1, 4), [torch.randn(4, 4)])


def test_the_kernel_rejects_a_zero_head_dim_with_a_message():
    # head_dim divides the projections' widths: 0 must be refused, not divide by zero.
    module = load_kernel(decode_block.SOURCE)
    weights = [module.pack(torch.randn(4, 8)) for _ in range(3)]
    empty = torch.zeros(2, 0)
    with pytest.raises(RuntimeError, match="head_dim must be > 0, got 0"):
        module.attention_inputs(
            torch.randn(2, 8), torch.ones(8), 1e-5, weights, [4] * 3, [None] * 3, empty, empty,
            0, True,
        )  # fmt: skip


@pytest.mark.parametrize("bad", ["cos_rows", "half", "heads"])
def test_the_kernel_rejects_inconsistent_arguments(bad):
    # The Python side checks what it dispatches; the kernel still refuses layouts that
    # would make it read out of bounds, with a message, not a crash.
    module = load_kernel(decode_block.SOURCE)
    hidden, head_dim = 8, 4
    x = torch.randn(2, hidden)
    weights = [module.pack(torch.randn(o, hidden)) for o in (8, 4, 4)]
    cos = torch.randn(1 if bad == "cos_rows" else 2, 3 if bad == "half" else 2)
    outs = [8, 4, 6] if bad == "heads" else [8, 4, 4]
    with pytest.raises(RuntimeError, match="cos and sin|whole heads|packed weight"):
        module.attention_inputs(
            x, torch.ones(hidden), 1e-5, weights, outs, [None] * 3, cos, cos, head_dim, True
        )


# -- DecodeStack: every block of a decode step, with attention and the cache, in one call --


def _random_blocks(gen, n_layers, hidden, heads, head_dim, intermediate, with_bias):
    n_heads, kv_heads = heads
    outs = (n_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    blocks = []
    for _ in range(n_layers):
        qkv = tuple(torch.randn(o, hidden, generator=gen) / hidden**0.5 for o in outs)
        bias = [torch.randn(o, generator=gen) / 4 if with_bias else None for o in (*outs, hidden)]
        blocks.append(
            decode_block.BlockWeights(
                (torch.rand(hidden, generator=gen) + 0.5, 1e-5),
                qkv,
                tuple(bias[:3]),
                (torch.randn(hidden, outs[0], generator=gen) / outs[0] ** 0.5, bias[3]),
                (torch.rand(hidden, generator=gen) + 0.5, 1e-6),
                (
                    torch.randn(intermediate, hidden, generator=gen) * 2,
                    torch.randn(intermediate, hidden, generator=gen) / hidden**0.5,
                    torch.randn(hidden, intermediate, generator=gen) / intermediate**0.5,
                ),
            )
        )
    return blocks


def _in_dtype(blocks, dtype):
    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) else t

    return [decode_block.BlockWeights(*(tuple(map(cast, part)) for part in w)) for w in blocks]


def _stack_reference(x, blocks, storage, cos, sin, heads, head_dim, interleaved):
    """x (batch, hidden) through `blocks` by torch ops (attention: the materialised
    `reference` backend over the gathered blocks), writing K/V into `storage`'s pools."""
    from attnkit import attention
    from attnkit.ops.masks import padding

    k_pool, v_pool, table, starts = storage[:4]
    b, bs = x.shape[0], k_pool.shape[2]
    rows, where = torch.arange(b), (table[torch.arange(b), starts // bs], starts % bs)
    for layer, w in enumerate(blocks):
        q, k, v = _inputs_reference(
            x.view(b, 1, -1), *w.attn_norm, w.qkv, w.qkv_bias, cos.view(b, 1, -1),
            sin.view(b, 1, -1), heads, head_dim, interleaved,
        )  # fmt: skip
        k_pool[layer][where], v_pool[layer][where] = k[rows, :, 0], v[rows, :, 0]
        # (batch, blocks · bs, kv_heads, d) -> (batch, kv_heads, keys, d); unused slots as 0
        keys, values = (
            p[layer][table].flatten(1, 2).transpose(1, 2).nan_to_num(0.0) for p in (k_pool, v_pool)
        )
        out = attention(q, keys, values, padding(starts + 1), backend="reference")
        attn = out.transpose(1, 2).reshape(b, 1, -1)
        x = _outputs_reference(x.view(b, 1, -1), attn, *w.wo, *w.mlp_norm, *w.mlp).view(b, -1)
    return x


@pytest.mark.parametrize("layout", ["contiguous", "paged-1", "paged-4"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_decode_stack_equals_the_blocks_by_torch_ops(layout, interleaved, with_bias):
    # 3 blocks, 9 query / 3 KV heads of head dim 10 (8 rotated), a ragged batch (a first
    # token, lengths not filling the last block); unused cache slots hold NaN. The stack's
    # output and the K/V it stores: the 2x rule against float64, nothing else written.
    gen = torch.Generator().manual_seed(len(layout) + 2 * interleaved + with_bias)
    heads, head_dim, half, hidden, intermediate = (9, 3), 10, 4, 54, 37
    blocks = _random_blocks(gen, 3, hidden, heads, head_dim, intermediate, with_bias)
    starts = torch.tensor([0, 6, 13, 2])
    batch = len(starts)
    if layout == "contiguous":  # a (layers, slots, kv_heads, capacity, d) buffer, slots reordered
        buffers = [torch.full((3, 5, heads[1], 16, head_dim), math.nan) for _ in "kv"]
        k_pool, v_pool = (t.transpose(2, 3) for t in buffers)
        table = torch.tensor([[3], [0], [4], [1]])
    else:  # a shuffled pool of blocks
        bs = int(layout.split("-")[1])
        per_seq = 16 // bs
        k_pool, v_pool = (
            torch.full((3, batch * per_seq + 2, bs, heads[1], head_dim), math.nan) for _ in "kv"
        )
        table = torch.randperm(batch * per_seq + 2, generator=gen)[: batch * per_seq]
        table = table.view(batch, per_seq)
    for pool in (k_pool, v_pool):  # the cached tokens, before this step's
        for b in range(batch):
            for pos in range(int(starts[b])):
                block, offset = table[b, pos // pool.shape[2]], pos % pool.shape[2]
                pool[:, block, offset] = torch.randn(3, heads[1], head_dim, generator=gen)
    x = torch.randn(batch, 1, hidden, generator=gen)
    angles = torch.rand(batch, half, generator=gen) * 30
    cos, sin = angles.cos(), angles.sin()

    storage = decode_block.KVStorage(k_pool.clone(), v_pool.clone(), table, starts)
    stack = decode_block.DecodeStack(blocks, heads, head_dim, intermediate, interleaved)
    assert len(stack) == 3
    got = stack(x, storage, cos, sin)

    shape = (heads, head_dim, interleaved)
    plain_storage = decode_block.KVStorage(k_pool.clone(), v_pool.clone(), table, starts)
    plain = _stack_reference(x.view(batch, -1), blocks, plain_storage, cos, sin, *shape)
    want_storage = decode_block.KVStorage(k_pool.double(), v_pool.double(), table, starts)
    args = (_in_dtype(blocks, torch.float64), want_storage, cos.double(), sin.double())
    want = _stack_reference(x.view(batch, -1).double(), *args, *shape)
    assert got.shape == x.shape
    _within_2x(got.view(batch, -1), plain, want)
    pools = zip(storage[:2], plain_storage[:2], want_storage[:2], strict=True)
    for got_pool, plain_pool, want_pool in pools:
        written = ~want_pool.isnan()
        assert torch.equal(got_pool.isnan(), ~written)  # the new rows written, nothing else
        _within_2x(got_pool[written], plain_pool[written], want_pool[written])


def _one_block_stack(gen, block_size=4):
    heads, head_dim, hidden = (2, 1), 4, 8
    blocks = _random_blocks(gen, 1, hidden, heads, head_dim, 8, False)
    stack = decode_block.DecodeStack(blocks, heads, head_dim, 8, False)
    pools = [torch.zeros(1, 3, block_size, 1, head_dim) for _ in "kv"]
    return stack, pools, torch.randn(2, 1, hidden), torch.ones(2, 2), torch.zeros(2, 2)


@pytest.mark.parametrize(
    ("table", "starts", "message"),
    [
        ([[0], [1]], [3, 4], "sequence 1 starts at 4, past its block table"),
        ([[0], [1]], [3, -1], "sequence 1 starts at -1"),
        ([[0], [7]], [1, 2], "block id 7 is outside the cache's 3 blocks"),
        ([[0, 1], [2, -1]], [1, 5], "block id -1 is outside"),
    ],
)
def test_decode_stack_refuses_writes_outside_the_cache(table, starts, message):
    # Positions come from the cache's bookkeeping; the kernel still refuses any write
    # outside its pools, before writing anything, with a message.
    stack, pools, x, cos, sin = _one_block_stack(torch.Generator().manual_seed(3))
    before = [p.clone() for p in pools]
    storage = decode_block.KVStorage(*pools, torch.tensor(table), torch.tensor(starts))
    with pytest.raises(RuntimeError, match=message):
        stack(x, storage, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(pools, before, strict=True))


def _one_latent_block_stack(gen, block_size=4):
    hidden, heads, rank, rope, nope, v_dim = 8, 2, 4, 2, 3, 4

    def w(*shape):
        return torch.randn(*shape, generator=gen)

    block = decode_block.LatentBlockWeights(
        (w(hidden), 1e-6), (w(heads * (nope + rope), hidden), None), (w(rank + rope, hidden), None),
        (w(rank), 1e-6), w(heads * (nope + v_dim), rank), (w(hidden, heads * v_dim), None),
        (w(hidden), 1e-6), (w(8, hidden), w(8, hidden), w(hidden, 8)),
    )  # fmt: skip
    shape = decode_block.LatentShape(heads, rank, 1, rope, v_dim, 8)
    stack = decode_block.LatentDecodeStack([block], shape, [(nope, 0.5, (0,))], False)
    pools = [torch.zeros(1, 3, block_size, 1, width) for width in (rank, rope)]
    return stack, pools, torch.randn(2, 1, hidden), torch.ones(2, 2), torch.zeros(2, 2)


@pytest.mark.parametrize(
    ("table", "starts", "message"),
    [
        ([[0], [1]], [3, 4], "sequence 1 starts at 4, past its block table"),
        ([[0], [1]], [3, -1], "sequence 1 starts at -1"),
        ([[0], [7]], [1, 2], "block id 7 is outside the cache's 3 blocks"),
        ([[0, 1], [9, 2]], [1, 5], "block id 9 is outside"),  # a block it reads, not writes
    ],
)
def test_latent_stack_refuses_reads_and_writes_outside_the_cache(table, starts, message):
    stack, pools, x, cos, sin = _one_latent_block_stack(torch.Generator().manual_seed(5))
    before = [p.clone() for p in pools]
    storage = decode_block.KVStorage(*pools, torch.tensor(table), torch.tensor(starts))
    with pytest.raises(RuntimeError, match=message):
        stack(x, storage, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(pools, before, strict=True))


def test_decode_stack_refuses_a_cache_of_another_shape():
    stack, pools, x, cos, sin = _one_block_stack(torch.Generator().manual_seed(4))
    table, starts = torch.tensor([[0], [1]]), torch.tensor([0, 0])
    wrong = [torch.zeros(1, 3, 4, 2, 4) for _ in "kv"]  # 2 KV heads, the stack has 1
    wanted = r"k_cache and v_cache must both be float32 or int8 \(layers >= 1"
    with pytest.raises(RuntimeError, match=wanted):
        stack(x, decode_block.KVStorage(*wrong, table, starts), cos, sin)
    with pytest.raises(RuntimeError, match="block_table must be"):
        stack(x, decode_block.KVStorage(*pools, table[:1], starts), cos, sin)
    int8 = [p.to(torch.int8) for p in pools]
    scales = [torch.ones(p.shape[:4]) for p in pools]
    error = torch.zeros(3, dtype=torch.float64)
    bad = [
        (int8, None, None, "k_scale, v_scale and error go with int8 caches"),
        (pools, scales, error, "k_scale, v_scale and error go with int8 caches"),
        (int8, [s[..., :0] for s in scales], error, r"k_scale and v_scale must be float32 \("),
        (int8, scales, error.float(), "error must be a contiguous float64 tensor of 3"),
    ]
    for kv, sc, err, message in bad:
        with pytest.raises(RuntimeError, match=message):
            stack(x, decode_block.KVStorage(*kv, table, starts, scales=sc, error=err), cos, sin)


def test_decode_stack_says_which_caches_it_serves():
    # The model asks before calling, so a cache of another dtype or shape takes the
    # per-block path (which explains its own errors) instead of the kernel's refusal.
    stack, pools, *_ = _one_block_stack(torch.Generator().manual_seed(5))
    table, starts = torch.tensor([[0], [1]]), torch.tensor([0, 0])
    assert stack.serves(decode_block.KVStorage(*pools, table, starts))
    for other in (
        [p.double() for p in pools],
        [torch.zeros(1, 3, 4, 2, 4) for _ in "kv"],  # 2 KV heads
        [torch.zeros(2, 3, 4, 1, 4) for _ in "kv"],  # 2 layers
        [pools[0], torch.zeros(1, 3, 4, 1, 5)],  # v of another head dim
    ):
        assert not stack.serves(decode_block.KVStorage(*other, table, starts))
