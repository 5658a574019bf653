"""Decode attention on the CPU: attnkit's fused C++ kernel vs torch, against the memory floor.

    PYTHONPATH=src python benchmarks/cpu_decode.py [--quick] [--repeats N] [--json]

One new query per sequence, GQA (32 query / 8 KV heads, head dim 128, float32). For each
batch and context it times, in the same run:

- `floor`: the K/V bytes read once at the copy bandwidth measured beside each call
  (`dst.copy_(src)` of 64 MiB float32, counting bytes read and written);
- `cpp contiguous`: `decode_attention(q, k, v, backend="cpp")` on a `(batch, kv_heads, n, d)`
  cache;
- `cpp paged`: `paged_decode(..., backend="cpp")` on a pool of 16-token blocks in shuffled
  order (as a long-running server's pool looks);
- `sdpa folded`: torch SDPA with each KV head's query group folded into rows,
  `scaled_dot_product_attention(q.reshape(b, kv, G, d), k, v)`, the torch baseline.

Each timed call follows a 64 MiB copy: the copy is the floor's measurement and leaves the
last-level cache cold, as decoding a real model's layers finds it. Times are medians of
`--repeats` runs; ratios are medians of the per-run ratios (the floor measured next to its
call), which keeps load from other processes out of them as far as possible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console

from attnkit.ops.decode_attention import decode_attention
from attnkit.ops.paged_decode import paged_decode
from cold_calls import Evictor, check_repeats_and_kernel, timed
from tables import rows_table

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16


def problem(batch: int, context: int, seed: int = 0):
    """q, a contiguous cache and the same keys/values in a shuffled paged pool."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g)
    k = torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=g)
    v = torch.randn(batch, KV_HEADS, context, HEAD_DIM, generator=g)
    per_seq = -(-context // BLOCK)
    table = torch.randperm(batch * per_seq, generator=g).view(batch, per_seq).to(torch.int32)
    pools = []
    for t in (k, v):
        pool = torch.empty(batch * per_seq, BLOCK, KV_HEADS, HEAD_DIM)
        pool[table.long()] = t.transpose(1, 2).reshape(batch, per_seq, BLOCK, KV_HEADS, HEAD_DIM)
        pools.append(pool)
    lengths = torch.full((batch,), context, dtype=torch.int32)
    return q, k, v, pools[0], pools[1], table, lengths


def measure(batch: int, context: int, repeats: int, evict: Evictor) -> dict:
    q, k, v, k_pool, v_pool, table, lengths = problem(batch, context)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * q.element_size()
    group = HEADS // KV_HEADS
    q_folded = q.view(batch, KV_HEADS, group, HEAD_DIM)
    calls = {
        "contiguous": lambda: decode_attention(q, k, v, backend="cpp"),
        "paged": lambda: paged_decode(q, k_pool, v_pool, table, lengths, backend="cpp"),
        "sdpa": lambda: F.scaled_dot_product_attention(q_folded, k, v),
    }
    want = calls["sdpa"]().reshape(batch, HEADS, HEAD_DIM)
    err = max((calls[name]() - want).abs().max().item() for name in ("contiguous", "paged"))
    times = {name: [] for name in calls}
    ratios = {name: [] for name in calls}
    floors = []
    for _ in range(repeats):
        for name, fn in calls.items():
            floor = kv_bytes / (2 * evict.src.nbytes / timed(evict))
            seconds = timed(fn)
            floors.append(floor)
            times[name].append(seconds)
            ratios[name].append(seconds / floor)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    paged_vs_contiguous = [p / c for p, c in zip(times["paged"], times["contiguous"], strict=True)]
    return {
        "case": f"b={batch} ctx={context}",
        "K/V MiB": kv_bytes / 2**20,
        "floor ms": 1e3 * statistics.median(floors),
        "contiguous ms": ms["contiguous"],
        "contiguous / floor": statistics.median(ratios["contiguous"]),
        "paged ms": ms["paged"],
        "paged / floor": statistics.median(ratios["paged"]),
        "paged / contiguous": statistics.median(paged_vs_contiguous),
        "sdpa folded ms": ms["sdpa"],
        "sdpa / floor": statistics.median(ratios["sdpa"]),
        "max err": err,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, context 1k and 4k")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per call (>= 5)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    console = Console(stderr=args.json, width=200)
    started = time.perf_counter()
    check_repeats_and_kernel(parser, args)
    console.print(
        f"kernel ready in {time.perf_counter() - started:.1f} s (built on first use, then "
        f"cached); {torch.get_num_threads()} threads"
    )
    evict = Evictor()
    bandwidth = evict.bandwidth()
    console.print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
    batches, contexts = ((1, 8), (1024, 4096)) if args.quick else ((1, 8, 32), (1024, 4096, 16384))
    rows = []
    for b in batches:
        for n in contexts:
            rows.append(measure(b, n, args.repeats, evict))
            console.print(f"  {rows[-1]['case']} done", style="dim")
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    title = (
        f"decode attention, {HEADS}/{KV_HEADS} heads, d {HEAD_DIM}, float32, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats}"
    )
    console.print(rows_table(title, rows))


if __name__ == "__main__":
    main()
