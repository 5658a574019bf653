"""Prefill and MLA decode on a GPU: attnkit's Triton kernels vs torch, in one run.

    PYTHONPATH=src python benchmarks/gpu_attention.py [--quick] [--markdown]

Issue 7's GPU targets, each a ratio against a baseline timed in the same run (medians of
triton.testing.do_bench, bfloat16):

- dense causal prefill, 32 query / 8 KV heads, head dim 128, N = 4k and 16k: the `triton`
  backend vs torch SDPA's FlashAttention kernel (goal >= 0.9x);
- sliding window 512 (and + 4 sinks) at N = 16k: `triton` vs compiled FlexAttention with a
  block mask, steady state (goal >= 1.2x), and vs SDPA with a dense boolean mask;
- MLA absorbed decode, DeepSeek-V2-Lite dims (16 heads, latent 512 + RoPE 64), batch 1-32,
  context 4k-16k: the fused kernel vs the same step in torch ops (`latent_decode`'s torch
  path) and vs the floor: latent + RoPE bytes read once at the measured copy bandwidth.

Needs CUDA and Triton. Written without a GPU lent (2026-12-04): not yet run on one.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import attnkit
from attnkit import masks
from attnkit.ops.latent_decode import latent_decode
from gpu_paged_decode import gpu_session, print_rows

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
MLA_HEADS, RANK, ROPE = 16, 512, 64


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def prefill_rows(n: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(n)

    def draw(heads):
        return torch.randn(1, heads, n, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)

    q, k, v = draw(HEADS), draw(KV_HEADS), draw(KV_HEADS)
    rows = []
    ours = bench(lambda: attnkit.attention(q, k, v, masks.causal(), backend="triton"))

    # SDPA's flash kernel on K/V repeated to every query head: the same work, a layout
    # every torch version's flash backend takes
    k_full, v_full = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))

    def flash():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    want = flash().float()
    got = attnkit.attention(q, k, v, masks.causal(), backend="triton").float()
    theirs = bench(flash)
    err = (got - want).abs().max().item()
    rows.append(_row(f"causal N={n}", ours, "SDPA flash", theirs, 0.9, err))
    if n < 16384:
        return rows
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    for name, mask, mod in (
        ("window 512", masks.sliding_window(512), lambda b, h, i, j: (j <= i) & (i - j < 512)),
        (
            "window 512 + 4 sinks",
            masks.sliding_window(512) | masks.sinks(4),
            lambda b, h, i, j: (j <= i) & ((i - j < 512) | (j < 4)),
        ),
    ):
        ours = bench(lambda mask=mask: attnkit.attention(q, k, v, mask, backend="triton"))
        block_mask = create_block_mask(mod, 1, 1, n, n, device="cuda")
        flex_ms = bench(lambda bm=block_mask: flex(q, k, v, block_mask=bm, enable_gqa=True))
        dense = mask.dense(n, n, 0, device="cuda")
        try:
            sdpa_ms = bench(
                lambda d=dense: F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=d)
            )
        except torch.OutOfMemoryError:  # a kernel that materialises the scores: no row
            sdpa_ms = float("nan")
        del dense
        got = attnkit.attention(q, k, v, mask, backend="triton").float()
        want = flex(q, k, v, block_mask=block_mask, enable_gqa=True).float()
        err = (got - want).abs().max().item()
        rows.append(_row(f"{name} N={n}", ours, "FlexAttention (compiled)", flex_ms, 1.2, err))
        rows.append(_row(f"{name} N={n}", ours, "SDPA dense mask", sdpa_ms, None, err))
    return rows


def mla_rows(batch: int, context: int, bandwidth: float) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(batch + context)

    def draw(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    q_latent, q_rope = draw(batch, MLA_HEADS, RANK), draw(batch, MLA_HEADS, ROPE)
    latent, k_rope = draw(batch, context, RANK), draw(batch, context, ROPE)
    lengths = torch.full((batch,), context, device="cuda")
    args = (q_latent, q_rope, latent, k_rope, lengths)
    ours = bench(lambda: latent_decode(*args, scale=0.07, backend="triton"))
    torch_ms = bench(lambda: latent_decode(*args, scale=0.07, backend="torch"))
    err = (
        latent_decode(*args, scale=0.07, backend="triton").float()
        - latent_decode(*args, scale=0.07, backend="torch").float()
    )
    floor = (latent.nbytes + k_rope.nbytes) / bandwidth * 1e3  # ms to read the cache once
    case = f"MLA decode b={batch} ctx={context}"
    error = err.abs().max().item()
    return [
        _row(case, ours, "torch ops (einsum)", torch_ms, None, error),
        _row(case, ours, "floor (cache bytes / copy BW)", floor, 1 / 1.5, error),
    ]


def _row(case, ours, baseline, theirs, goal, err) -> dict:
    speed = theirs / ours
    met = "—" if goal is None else ("yes" if speed >= goal else "no")
    return {
        "case": case,
        "attnkit ms": ours,
        "baseline": baseline,
        "baseline ms": theirs,
        "speed": speed,
        "goal": "—" if goal is None else f"{goal:.2g}x",
        "met": met,
        "max err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=4k prefill, batch 1/8 decode")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    console, device, bandwidth = gpu_session("gpu_attention.py")
    lengths, batches, contexts = (
        ((4096,), (1, 8), (4096,)) if args.quick else ((4096, 16384), (1, 8, 32), (4096, 16384))
    )
    rows = [row for n in lengths for row in prefill_rows(n)]
    rows += [row for b in batches for n in contexts for row in mla_rows(b, n, bandwidth)]
    print_rows(console, rows, f"attnkit Triton kernels, bf16, {device}", args.markdown)


if __name__ == "__main__":
    main()
