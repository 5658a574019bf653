"""The `triton` attention backend (FlashAttention forward) equals the float64 reference.

It runs its real kernel: on CUDA where there is one, otherwise in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU), so its band limits, tile
edges, position masks, online softmax and empty rows are checked in CI on CPU. Tolerance:
the 2x rule of attn_testing (error vs float64 <= 2x the plain implementation's in the same
dtype), on the output and the log-sum-exp. Its GPU speed is not measured yet.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import attnkit
from attn_testing import assert_matches_reference, random_qkv
from attnkit import masks
from attnkit.ops.backends import TritonBackend

# 16 x 16 tiles: several tiles and a partial last one at every size below; default tiles too
SMALL_TILES = TritonBackend(block_m=16, block_n=16)
BACKENDS = [pytest.param(SMALL_TILES, id="tiles16"), pytest.param("triton", id="default")]
MASKS = {
    "none": None,
    "causal": masks.causal(),
    "window1": masks.sliding_window(1),
    "window19": masks.sliding_window(19),
    "window19+sinks3": masks.sliding_window(19) | masks.sinks(3),
    "sinks20|window5": masks.sinks(20) | masks.sliding_window(5),  # sinks past the band
}
HEADS = {"mha": (4, 4), "gqa": (9, 3), "mqa": (6, 1)}
# self, decode, chunked prefill against a cache, more queries than keys (rows that see nothing)
SIZES = [(1, 1), (1, 97), (23, 97), (97, 97), (40, 13)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("sizes", SIZES, ids=[f"{q}x{k}" for q, k in SIZES])
def test_triton_matches_reference_float32(backend, mask_name, sizes):
    n_q, n_k = sizes
    gen = torch.Generator().manual_seed(zlib.crc32(repr((mask_name, sizes)).encode()))
    heads, kv_heads = list(HEADS.values())[len(mask_name) % 3]
    q, k, v = random_qkv(gen, batch=2, heads=heads, kv_heads=kv_heads, n_q=n_q, n_k=n_k)
    assert_matches_reference(backend, q, k, v, mask=MASKS[mask_name])


def block_masks(n_q: int, n_k: int, gen: torch.Generator) -> dict[str, object]:
    """Block-sparse layouts (block 4, one shared and one per sequence), alone and and-ed."""
    blocks = (-(-max(n_q, n_k) // 4), -(-n_k // 4))
    shared = torch.rand(*blocks, generator=gen) < 0.5
    per_sequence = torch.rand(2, *blocks, generator=gen) < 0.4
    return {
        "block": masks.block_sparse(shared, 4),
        "block-per-seq": masks.block_sparse(per_sequence, 4),
        "block&causal": masks.block_sparse(shared, 4) & masks.causal(),
        "window19&block": masks.sliding_window(19) & masks.block_sparse(per_sequence, 4),
    }


BLOCK_MASKS = list(block_masks(1, 1, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name", BLOCK_MASKS)
@pytest.mark.parametrize("sizes", SIZES[1:], ids=[f"{q}x{k}" for q, k in SIZES[1:]])
def test_block_sparse_matches_reference_float32(backend, mask_name, sizes):
    n_q, n_k = sizes
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("block", mask_name, sizes)).encode()))
    q, k, v = random_qkv(gen, batch=2, heads=9, kv_heads=3, n_q=n_q, n_k=n_k)
    assert_matches_reference(backend, q, k, v, mask=block_masks(n_q, n_k, gen)[mask_name])


def test_block_sparse_keeping_every_block_equals_causal():
    gen = torch.Generator().manual_seed(31)
    q, k, v = random_qkv(gen, n_q=37, n_k=37)
    every = masks.block_sparse(torch.ones(10, 10, dtype=torch.bool), 4) & masks.causal()
    dense = attnkit.attention(q, k, v, masks.causal(), backend=SMALL_TILES)
    assert torch.equal(attnkit.attention(q, k, v, every, backend=SMALL_TILES), dense)


def test_blocks_no_query_keeps_are_never_read():
    """Key tiles the layout drops for every query are skipped, not read and masked: NaN
    poured into them leaves the output exact."""
    gen = torch.Generator().manual_seed(37)
    q, k, v = random_qkv(gen, n_q=64, n_k=64)
    layout = torch.ones(4, 4, dtype=torch.bool)
    layout[:, 2] = False  # keys 32-47 (block 16) are seen by nobody
    mask = masks.block_sparse(layout, 16)
    clean = attnkit.attention(q, k, v, mask, backend=SMALL_TILES)
    k[:, :, 32:48], v[:, :, 32:48] = math.nan, math.nan
    assert torch.equal(attnkit.attention(q, k, v, mask, backend=SMALL_TILES), clean)


def test_transposed_and_permuted_layouts_read_as_their_values():
    """Regression: a layout with other strides (`.t()`, a permuted per-sequence stack) was
    read as packed rows and gave wrong outputs (error 2.6)."""
    gen = torch.Generator().manual_seed(43)
    q, k, v = random_qkv(gen, batch=2, n_q=40, n_k=40)
    shared = (torch.rand(6, 10, generator=gen) < 0.5).t()  # (10, 6), strides (1, 10)
    per_sequence = (torch.rand(6, 2, 6, generator=gen) < 0.5).permute(1, 0, 2)
    for layout in (shared, per_sequence):
        assert not layout.is_contiguous()
        assert_matches_reference(SMALL_TILES, q, k, v, mask=masks.block_sparse(layout, 7))


@pytest.mark.parametrize(
    ("mask", "q_offset", "n_q", "n_k", "hidden"),
    [
        # block 1 of 8 dropped for every query: keys 4-7 sit inside a kept 16-key tile
        (
            masks.block_sparse(
                torch.ones(8, 8, dtype=torch.bool).index_fill(1, torch.tensor([1]), False), 4
            ),
            None,
            32,
            32,
            slice(4, 8),
        ),
        # causal with queries at 3..7: keys 8.. sit in the kept tile, past every query
        (
            masks.block_sparse(torch.ones(8, 8, dtype=torch.bool), 4) & masks.causal(),
            3,
            5,
            20,
            slice(8, None),
        ),
    ],
    ids=["dropped-block-in-kept-tile", "causal-tail-in-kept-tile"],
)
def test_unseen_keys_inside_a_kept_tile_are_never_read(mask, q_offset, n_q, n_k, hidden):
    """Regression: the block-sparse path read whole kept tiles, so NaN in a key no query
    sees reached the output through 0 · NaN."""
    gen = torch.Generator().manual_seed(47)
    q, k, v = random_qkv(gen, n_q=n_q, n_k=n_k)
    clean = attnkit.attention(q, k, v, mask, backend=SMALL_TILES, q_offset=q_offset)
    k[:, :, hidden], v[:, :, hidden] = math.nan, math.nan
    poisoned = attnkit.attention(q, k, v, mask, backend=SMALL_TILES, q_offset=q_offset)
    assert not torch.isnan(poisoned).any()
    assert torch.equal(clean, poisoned)


@pytest.mark.parametrize(
    ("mask", "q_offset"),
    [
        (masks.sliding_window(1000), None),  # a window wider than every sequence
        (masks.sliding_window(5) | masks.sinks(40), None),  # sinks past the band
        (masks.causal(), -5),  # rows before key 0 see nothing
        (masks.causal(), 27),
        (
            masks.block_sparse(
                torch.rand(4, 2, generator=torch.Generator().manual_seed(1)) < 0.6, 24
            ),
            None,
        ),
    ],
    ids=["wide-window", "many-sinks", "offset-negative", "offset-27", "block24-vs-tiles16"],
)
def test_edges_of_windows_offsets_and_layout_blocks(mask, q_offset):
    gen = torch.Generator().manual_seed(53)
    q, k, v = random_qkv(gen, n_q=30, n_k=45)
    assert_matches_reference(SMALL_TILES, q, k, v, mask=mask, q_offset=q_offset)


def test_head_dim_limit_256_passes_and_257_is_refused():
    gen = torch.Generator().manual_seed(59)
    q, k, v = random_qkv(gen, batch=1, heads=2, kv_heads=1, n_q=5, n_k=5, head_dim=256)
    assert_matches_reference(SMALL_TILES, q, k, v, mask=masks.causal())
    q, k, v = random_qkv(gen, batch=1, heads=2, kv_heads=1, n_q=5, n_k=5, head_dim=257)
    with pytest.raises(ValueError, match="head dims up to 256, got q head_dim 257"):
        attnkit.attention(q, k, v, masks.causal(), backend="triton")


OFFSETS_PAST_INT32 = """
import torch, attnkit
from attnkit import masks
# three sequences of 2^26 keys x 16 dims: batch b starts 2^30 * b elements in, past int32
# from b = 2. Memory is touched only where written (the last key), so this costs ~KB.
device = "cuda" if torch.cuda.is_available() else "cpu"
k = torch.empty(3, 1, 2**26, 16, dtype=torch.float16, device=device)
v = torch.empty(3, 1, 2**26, 16, dtype=torch.float16, device=device)
k[:, :, -1] = 0.5
v[:, :, -1] = torch.tensor([1.0, 2.0, 3.0], device=device).view(3, 1, 1).half()
q = torch.ones(3, 1, 1, 16, dtype=torch.float16, device=device)
with torch.no_grad():
    out = attnkit.attention(q, k, v, masks.sliding_window(1), backend="triton")
print(out[:, 0, 0, 0].tolist())
"""


@pytest.mark.slow
def test_batch_offsets_past_2_to_the_31_elements_do_not_wrap():
    """Regression: batch offsets were int32 products and wrapped past 2^31 elements (a
    segfault in the interpreter, wrong reads on a GPU). Run in its own process: a wrapped
    offset is a crash, which must fail this test, not the session."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", OFFSETS_PAST_INT32], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[1.0, 2.0, 3.0]"


@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
@pytest.mark.parametrize("dims", [(64, 64), (59, 111), (111, 59)], ids=["64", "59v111", "111v59"])
def test_head_layouts_and_unequal_value_dim(heads, dims):
    gen = torch.Generator().manual_seed(sum(dims) + len(heads))
    n_heads, kv_heads = HEADS[heads]
    q, k, v = random_qkv(
        gen, 2, n_heads, kv_heads, n_q=33, n_k=41, head_dim=dims[0], v_head_dim=dims[1]
    )
    assert_matches_reference(SMALL_TILES, q, k, v, mask=masks.causal())


HALF = [
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(),
            reason="Triton 3.9's interpreter multiplies bfloat16 tiles wrongly on CPU; "
            "float16 covers the same half-precision path here",
        ),
    ),
]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    "mask", [masks.causal(), masks.sliding_window(9) | masks.sinks(1)], ids=str
)
def test_half_precision_matches_reference(dtype, mask):
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(gen, n_q=37, n_k=53, head_dim=64, dtype=dtype)
    assert_matches_reference(SMALL_TILES, q, k, v, mask=mask)


def test_float16_scores_past_the_half_range_do_not_overflow():
    """Scores of ~1e5 (far past float16's 65504) stay finite: the softmax runs in float32."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(gen, n_q=20, n_k=20, head_dim=64, dtype=torch.float16)
    out = attnkit.attention(q * 40, k * 40, v, masks.causal(), backend=SMALL_TILES)
    assert torch.isfinite(out).all()
    want = attnkit.attention((q * 40).double(), (k * 40).double(), v.double(), masks.causal())
    assert (out.double() - want).abs().max() < 1e-2  # float16 inputs: 11-bit values


def test_explicit_q_offset_and_scale():
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen, n_q=5, n_k=20)
    assert_matches_reference(SMALL_TILES, q, k, v, mask=masks.causal(), q_offset=3, scale=0.05)


def test_non_contiguous_inputs_work():
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, n_q=30, n_k=60, head_dim=64)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, d) memory: strided heads
    k_s = k[:, :, ::2]  # every other key: a sequence stride of 2 d
    v_s = v[:, :, ::2, ::2]  # and a last-dim stride of 2 (copied before the kernel)
    assert_matches_reference(SMALL_TILES, q_t, k_s, v_s, mask=masks.sliding_window(7))


@pytest.mark.parametrize(
    ("mask", "q_offset", "hidden"),
    [
        # 16 queries at the end of 97 keys, window 8 (+ 2 sinks): keys [2, 74) unseen
        (masks.sliding_window(8) | masks.sinks(2), None, slice(2, 74)),
        # causal, queries at positions 3..7: keys 8.. unseen
        (masks.causal(), 3, slice(8, None)),
    ],
    ids=["window+sinks", "causal-offset"],
)
def test_keys_outside_every_band_are_never_read(mask, q_offset, hidden):
    """NaN poured into keys no query may see leaves the output exact: the kernel skips the
    tiles outside each query tile's band instead of masking them after reading."""
    gen = torch.Generator().manual_seed(13)
    n_q = 16 if q_offset is None else 5
    q, k, v = random_qkv(gen, n_q=n_q, n_k=97 if q_offset is None else 20)
    clean = attnkit.attention(q, k, v, mask, backend=SMALL_TILES, q_offset=q_offset)
    k[:, :, hidden], v[:, :, hidden] = math.nan, math.nan
    poisoned = attnkit.attention(q, k, v, mask, backend=SMALL_TILES, q_offset=q_offset)
    assert torch.equal(clean, poisoned)


def test_rows_that_see_nothing_give_zeros_and_lse_minus_inf():
    gen = torch.Generator().manual_seed(17)
    q, k, v = random_qkv(gen, n_q=20, n_k=8)  # bottom-right: rows 0..11 sit before key 0
    out, lse = attnkit.attention(q, k, v, masks.causal(), backend=SMALL_TILES, return_lse=True)
    assert torch.equal(out[:, :, :12], torch.zeros_like(out[:, :, :12]))
    assert torch.isneginf(lse[:, :, :12]).all() and torch.isfinite(lse[:, :, 12:]).all()


def test_repeated_runs_are_bitwise_identical():
    gen = torch.Generator().manual_seed(19)
    q, k, v = random_qkv(gen, n_q=33, n_k=33)
    first = attnkit.attention(q, k, v, masks.causal(), backend=SMALL_TILES)
    assert torch.equal(first, attnkit.attention(q, k, v, masks.causal(), backend=SMALL_TILES))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"softcap": 30.0}, "no softcap"),
        ({"mask": masks.chunked(4)}, "serves no mask, causal"),
        (
            {"mask": masks.block_sparse(torch.ones(2, 2, dtype=torch.bool), 4) & masks.chunked(3)},
            "serves no mask, causal",
        ),
        ({"mask": masks.padding(torch.tensor([3, 5]))}, "serves no mask, causal"),
    ],
    ids=["softcap", "chunked", "block&chunked", "padding"],
)
def test_requests_it_cannot_serve_name_the_reason(kwargs, message):
    gen = torch.Generator().manual_seed(23)
    q, k, v = random_qkv(gen, n_q=6, n_k=6)
    with pytest.raises(ValueError, match=f"backend 'triton' cannot serve this request.*{message}"):
        attnkit.attention(q, k, v, backend="triton", **kwargs)


def test_float64_and_gradients_are_refused():
    gen = torch.Generator().manual_seed(29)
    q, k, v = random_qkv(gen, n_q=6, n_k=6, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16, got torch.float64"):
        attnkit.attention(q, k, v, masks.causal(), backend="triton")
    q, k, v = (t.float().requires_grad_(True) for t in (q, k, v))
    with pytest.raises(ValueError, match="has no backward, but an input requires grad"):
        attnkit.attention(q, k, v, masks.causal(), backend="triton")


@pytest.mark.parametrize(("name", "value"), [("block_m", 8), ("block_n", 48), ("block_m", True)])
def test_bad_tile_sizes_are_refused(name, value):
    with pytest.raises(ValueError, match=name):
        TritonBackend(**{name: value})
