"""Paged-KV decode on a GPU: attnkit's Triton kernel vs torch, against the HBM floor.

    PYTHONPATH=src python benchmarks/gpu_paged_decode.py [--quick] [--markdown]

One new query per sequence, GQA (32 query / 8 KV heads, head dim 128, bfloat16), the K/V
in a pool of 16-token blocks in shuffled order (as a long-running server's pool looks).
For each batch and context it times, in the same run (medians of triton.testing.do_bench):

- `triton`: `paged_decode(..., backend="triton", check=False)`, reading blocks in place
  (split-K, GQA folded, splits merged by lse), as an engine calls it; `triton checked`
  adds the value checks and their device sync;
- `gather+sdpa`: what `PagedCache.update` does today: gather the blocks into a contiguous
  copy, then torch SDPA (`enable_gqa=True`);
- `sdpa contiguous`: torch SDPA on K/V already contiguous (a contiguous cache's decode),
  the torch baseline the issue names;
- `floor`: the K/V bytes read once at the device-to-device copy bandwidth measured here.

It prints each time, the HBM bandwidth the kernel reaches (K/V bytes / time, as a share of
the measured copy bandwidth) and the ratios. Needs CUDA and Triton.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from attnkit.ops.paged_decode import paged_decode

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def copy_bandwidth() -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms / 1e3)


def problem(batch: int, context: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    per_seq = -(-context // BLOCK)
    num_blocks = batch * per_seq
    k_pool = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", generator=g)
    v_pool = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda", generator=g)
    order = torch.randperm(num_blocks, device="cuda", generator=g)
    table = order.view(batch, per_seq).to(torch.int32)
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", generator=g)
    lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return q.to(dtype), k_pool.to(dtype), v_pool.to(dtype), table, lengths


def measure(batch: int, context: int, bandwidth: float) -> dict:
    from triton.testing import do_bench

    q, k_pool, v_pool, table, lengths = problem(batch, context)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * q.element_size()

    def triton_call():  # as an engine calls it: tables valid by construction, no sync
        return paged_decode(q, k_pool, v_pool, table, lengths, backend="triton", check=False)

    def triton_checked():  # with the value checks (one device sync)
        return paged_decode(q, k_pool, v_pool, table, lengths, backend="triton")

    def gather_sdpa():
        k = k_pool[table.long()].flatten(1, 2).transpose(1, 2)  # (B, Hkv, N, d)
        v = v_pool[table.long()].flatten(1, 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)

    k_dense = k_pool[table.long()].flatten(1, 2).transpose(1, 2).contiguous()
    v_dense = v_pool[table.long()].flatten(1, 2).transpose(1, 2).contiguous()

    def sdpa_contiguous():
        return F.scaled_dot_product_attention(q.unsqueeze(2), k_dense, v_dense, enable_gqa=True)

    want = sdpa_contiguous().squeeze(2).float()
    err = (triton_call().float() - want).abs().max().item()
    times = {
        name: do_bench(fn, return_mode="median")
        for name, fn in (
            ("triton", triton_call),
            ("triton checked", triton_checked),
            ("gather+sdpa", gather_sdpa),
            ("sdpa contiguous", sdpa_contiguous),
        )
    }
    floor_ms = kv_bytes / bandwidth * 1e3  # HBM traffic of reading K/V once, at copy speed
    return {
        "case": f"b={batch} ctx={context}",
        "K/V MB": kv_bytes / 1e6,
        **{f"{k} ms": v for k, v in times.items()},
        "floor ms": floor_ms,
        "triton GB/s": kv_bytes / (times["triton"] / 1e3) / 1e9,
        "% of copy BW": 100 * floor_ms / times["triton"],
        "vs sdpa contiguous": times["sdpa contiguous"] / times["triton"],
        "vs gather+sdpa": times["gather+sdpa"] / times["triton"],
        "max err": err,
    }


def _split_and_merge(tensors, longest, programs, settings):
    from attnkit.ops.triton_paged import triton_paged_decode

    return triton_paged_decode(*tensors, 1.0, None, longest=longest, programs=programs, **settings)


def sweep(console: Console) -> None:
    """Launch settings of the kernel: time every combination on a few shapes, print the best."""
    import itertools

    from triton.testing import do_bench

    grid = list(itertools.product((32, 64, 128), (2, 4, 8), (2, 3, 4), (264, 528, 1056, 2112)))
    totals = {config: 0.0 for config in grid}
    for batch, context in ((1, 4096), (8, 16384), (32, 1024), (32, 16384)):
        q, k_pool, v_pool, table, lengths = problem(batch, context)
        results = []
        for config in grid:
            block_n, warps, stages, programs = config
            settings = dict(block_n=block_n, num_warps=warps, num_stages=stages)
            call = functools.partial(
                _split_and_merge, (q, k_pool, v_pool, table, lengths), context, programs, settings
            )
            ms = do_bench(call, return_mode="median")
            results.append((ms, config))
        best = min(results)[0]
        for ms, config in results:
            totals[config] += ms / best  # slowdown vs the best for this shape
        console.print(f"b={batch} ctx={context}: best {sorted(results)[:3]}")
    ranked = sorted(totals.items(), key=lambda item: item[1])
    console.print("(block_n, warps, stages, programs) by mean slowdown over the shapes:")
    for config, total in ranked[:8]:
        console.print(f"  {config}: {total / 4:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, context 4k only")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="tune the kernel's launch settings")
    args = parser.parse_args()
    console, device, bandwidth = gpu_session("gpu_paged_decode.py")
    if args.sweep:
        sweep(console)
        return
    batches, contexts = ((1, 8), (4096,)) if args.quick else ((1, 8, 32), (1024, 4096, 16384))
    rows = [measure(b, n, bandwidth) for b in batches for n in contexts]
    title = f"paged decode, {HEADS}/{KV_HEADS} heads, d {HEAD_DIM}, bf16, {device}"
    print_rows(console, rows, title, args.markdown)


def gpu_session(script: str) -> tuple[Console, str, float]:
    """(console, device name, copy bandwidth) for a GPU benchmark, the bandwidth printed;
    exits with a message where there is no CUDA GPU."""
    if not torch.cuda.is_available():
        sys.exit(f"{script} needs a CUDA GPU")
    console, device, bandwidth = Console(), torch.cuda.get_device_name(), copy_bandwidth()
    console.print(f"{device}; device-to-device copy: {bandwidth / 1e12:.2f} TB/s (read + write)")
    return console, device, bandwidth


def print_rows(console: Console, rows: list[dict], title: str, markdown: bool) -> None:
    """The rows (dicts sharing their keys) as a markdown table or a rich one."""
    columns = list(rows[0])
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*(_cell(row[c]) for c in columns))
    console.print(table)


def _cell(value) -> str:
    if isinstance(value, str):
        return value
    if abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


if __name__ == "__main__":
    main()
