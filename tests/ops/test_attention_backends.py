"""Every backend equals the float64 reference (the 2x tolerance rule, see attn_testing)."""

from __future__ import annotations

import zlib

import pytest
import torch

import attnkit
from attn_testing import assert_matches_reference, random_qkv
from attnkit import masks
from attnkit.ops.backends import GatheredBackend, TiledBackend

# Tiles that divide nothing below, so every tile edge case (last partial tile) is hit.
ODD_TILES = TiledBackend(block_q=5, block_k=7)
ODD_CHUNKS = GatheredBackend(chunk=6)  # several chunks, the last one partial
BACKENDS = [
    pytest.param("tiled", id="tiled"),
    pytest.param(ODD_TILES, id="tiled-5x7"),
    pytest.param("sdpa", id="sdpa"),
    pytest.param("gathered", id="gathered"),
    pytest.param(ODD_CHUNKS, id="gathered-6"),
    pytest.param(
        "flex",
        id="flex",
        marks=pytest.mark.skipif(
            "flex" not in attnkit.available_backends(), reason="this torch has no FlexAttention"
        ),
    ),
]
# torch SDPA (and so `gathered`) has no softcap/lse
LSE_BACKENDS = [b for b in BACKENDS if b.values[0] not in ("sdpa", "gathered", ODD_CHUNKS)]


def seed(*parts: object) -> int:
    """A stable seed per test case (str hashes change between processes)."""
    return zlib.crc32(repr(parts).encode())


HEADS = {"mha": (4, 4), "gqa": (9, 3), "mqa": (6, 1)}
# (n_q, n_k): self, decode, chunked prefill against a cache, more queries than keys.
SIZES = [(1, 1), (7, 7), (1, 97), (13, 97), (97, 97), (29, 13)]


def mask_cases(n_q: int, n_k: int, batch: int, gen: torch.Generator) -> dict[str, object]:
    """Every mask kind and a few compositions, sized for this problem."""
    q_docs = torch.sort(torch.randint(0, 3, (batch, n_q), generator=gen)).values
    kv_docs = torch.sort(torch.randint(0, 3, (batch, n_k), generator=gen)).values
    kv_lengths = torch.randint(0, n_k + 1, (batch,), generator=gen)
    kv_lengths[0] = n_k  # one full sequence beside padded ones
    block = 4
    layout = torch.rand(-(-max(n_q, n_k) // block), -(-n_k // block), generator=gen) < 0.6
    return {
        "none": None,
        "causal": masks.causal(),
        "window3": masks.sliding_window(3),
        "window3+sinks2": masks.sliding_window(3) | masks.sinks(2),
        "chunked5&causal": masks.chunked(5) & masks.causal(),
        "strided3|window3": masks.strided(3) | masks.sliding_window(3),
        "block_sparse": masks.block_sparse(layout, block),
        "document": masks.document(q_docs, kv_docs),
        "padding": masks.padding(kv_lengths),
        "padding-left&causal": masks.padding(kv_lengths, left=True) & masks.causal(),
        "prefix_lm": masks.prefix_lm(min(4, n_k)),
        "not-window": masks.causal() & ~masks.sliding_window(2),
        "tensor": torch.rand(batch, 1, n_q, n_k, generator=gen) < 0.7,
    }


MASK_NAMES = list(mask_cases(3, 3, 1, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_name", MASK_NAMES)
@pytest.mark.parametrize("sizes", SIZES, ids=[f"{q}x{k}" for q, k in SIZES])
def test_backend_matches_reference_for_every_mask_float32(backend, mask_name, sizes):
    n_q, n_k = sizes
    gen = torch.Generator().manual_seed(seed(mask_name, sizes))
    heads, kv_heads = list(HEADS.values())[seed(mask_name) % 3]
    q, k, v = random_qkv(gen, batch=2, heads=heads, kv_heads=kv_heads, n_q=n_q, n_k=n_k)
    mask = mask_cases(n_q, n_k, 2, gen)[mask_name]
    assert_matches_reference(backend, q, k, v, mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS, ids=list(HEADS))
@pytest.mark.parametrize("dims", [(64, 64), (59, 111), (111, 59)], ids=["64", "59v111", "111v59"])
def test_head_layouts_and_unequal_value_dim(backend, heads, dims):
    gen = torch.Generator().manual_seed(seed(heads, dims))
    n_heads, kv_heads = HEADS[heads]
    q, k, v = random_qkv(
        gen, 3, n_heads, kv_heads, n_q=33, n_k=41, head_dim=dims[0], v_head_dim=dims[1]
    )
    assert_matches_reference(backend, q, k, v, mask=masks.causal())


@pytest.mark.parametrize("backend", LSE_BACKENDS)
@pytest.mark.parametrize("softcap", [0.5, 30.0])
def test_softcap_matches_reference(backend, softcap):
    gen = torch.Generator().manual_seed(int(softcap * 10))
    q, k, v = random_qkv(gen, n_q=19, n_k=23, head_dim=32)
    assert_matches_reference(backend, q * 3, k * 3, v, mask=masks.causal(), softcap=softcap)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_match_reference(backend, dtype):
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(gen, n_q=37, n_k=53, head_dim=64, dtype=dtype)
    assert_matches_reference(backend, q, k, v, mask=masks.sliding_window(9) | masks.sinks(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_q_offset_overrides_alignment(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen, n_q=5, n_k=20)
    assert_matches_reference(backend, q, k, v, mask=masks.causal(), q_offset=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_argument(backend):
    gen = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(gen, n_q=9, n_k=9)
    assert_matches_reference(backend, q, k, v, mask=masks.causal(), scale=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tiled", "sdpa"])
@pytest.mark.parametrize("sizes", [(1023, 1024), (1024, 1023), (1025, 1025)], ids=str)
@pytest.mark.parametrize("mask_name", ["causal", "window", "document"])
def test_large_awkward_sizes(backend, sizes, mask_name):
    n_q, n_k = sizes
    gen = torch.Generator().manual_seed(n_q + n_k)
    q, k, v = random_qkv(gen, batch=1, heads=9, kv_heads=3, n_q=n_q, n_k=n_k, head_dim=59)
    mask = {
        "causal": masks.causal(),
        "window": masks.sliding_window(97) | masks.sinks(4),
        "document": masks.document(torch.arange(n_q) // 300, torch.arange(n_k) // 300)
        & masks.causal(),
    }[mask_name]
    assert_matches_reference(backend, q, k, v, mask=mask)


@pytest.mark.parametrize(
    "backend", ["tiled", ODD_TILES, "sdpa"], ids=["tiled", "tiled-5x7", "sdpa"]
)
@pytest.mark.parametrize(
    "mask", [masks.causal(), masks.sliding_window(5) | masks.sinks(1)], ids=str
)
def test_gradients_match_reference_float32(backend, mask):
    """Gradients: error vs float64 reference <= 3x the plain float32 implementation's."""
    gen = torch.Generator().manual_seed(seed("grad", str(mask)))
    inputs = random_qkv(gen, n_q=21, n_k=26, v_head_dim=12)
    upstream = torch.randn(2, 9, 21, 12, generator=gen)

    def grads(backend_, dtype):
        leaves = [t.detach().to(dtype, copy=True).requires_grad_(True) for t in inputs]
        out = attnkit.attention(*leaves, mask, backend=backend_)
        out.backward(upstream.to(dtype))
        return [t.grad.double() for t in leaves]

    want, plain, got = (
        grads("reference", torch.float64),
        grads("reference", torch.float32),
        grads(backend, torch.float32),
    )
    for name, w, p, g in zip("qkv", want, plain, got, strict=True):
        err, plain_err = (g - w).abs().max().item(), (p - w).abs().max().item()
        assert err <= 3 * plain_err + 1e-6, f"d{name}: {err:.3g} > 3 x {plain_err:.3g}"
