"""How a paged pool's block size sets its decode speed on the CPU, against a contiguous cache.

    PYTHONPATH=src python benchmarks/paged_block_size.py [--quick] [--repeats N] [--engine]

One new query per sequence, batch 8, float32, SmolLM2-135M's attention shape (9 query / 3 KV
heads, head dim 64: 768 bytes of K per token) or, with `--shape gqa`, GQA 32/8 d128 (4 KiB).
For each context and block size it times, in the same run and from cold caches:

- `contiguous`: `decode_attention(..., backend="cpp")` on a `(batch, kv_heads, n, d)` cache,
  the baseline every paged row is a ratio to;
- `paged shuffled` / `paged in order`: `paged_decode(..., backend="cpp")` on the same K/V in a
  pool whose blocks lie in random order (a long-running server's pool, or blocks handed out
  one at a time to sequences that grow together) or in order.
`--engine` adds whole decode steps of SmolLM2-135M (30 layers, batch 8) through a
`PagedCache` of 16- and 64-token blocks prefilled with random K/V, with the pool's blocks
shuffled (`seed`) and in order.

Each timed call follows a 64 MiB copy, which leaves the last-level cache cold. Times are
medians of `--repeats` runs, the calls taken in turn within each run.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from rich.console import Console

from attnkit.ops.decode_attention import decode_attention
from attnkit.ops.paged_decode import paged_decode
from cold_calls import Evictor, check_repeats_and_kernel, timed
from tables import rows_table

SHAPES = {"smollm2": (9, 3, 64), "gqa": (32, 8, 128)}
BATCH = 8
BLOCK_SIZES = (16, 32, 64, 128)


def paged_pools(k, v, block_size: int, order: torch.Tensor):
    """k, v `(batch, kv_heads, n, d)` stored in a pool of `block_size`-token blocks, the
    blocks of sequence b at `order[b * per_seq:(b + 1) * per_seq]`; and the block table."""
    batch, kv_heads, n, _ = k.shape
    per_seq = n // block_size
    table = order.view(batch, per_seq)
    pools = []
    for t in (k, v):
        pool = torch.empty(batch * per_seq, block_size, kv_heads, t.shape[-1])
        pool[table] = t.transpose(1, 2).reshape(batch, per_seq, block_size, kv_heads, -1)
        pools.append(pool)
    return pools[0], pools[1], table.to(torch.int32)


def measure(shape, context: int, repeats: int, evict) -> list[dict]:
    heads, kv_heads, dim = shape
    g = torch.Generator().manual_seed(context)
    q = torch.randn(BATCH, heads, dim, generator=g)
    k = torch.randn(BATCH, kv_heads, context, dim, generator=g)
    v = torch.randn(BATCH, kv_heads, context, dim, generator=g)
    lengths = torch.full((BATCH,), context, dtype=torch.int32)
    want = decode_attention(q.double(), k.double(), v.double(), backend="torch").float()
    calls = {"contiguous": lambda: decode_attention(q, k, v, backend="cpp")}
    for bs in BLOCK_SIZES:
        blocks = BATCH * context // bs
        for name, order in (
            ("shuffled", torch.randperm(blocks, generator=g)),
            ("in order", torch.arange(blocks)),
        ):
            kp, vp, table = paged_pools(k, v, bs, order)
            calls[f"{bs} {name}"] = lambda kp=kp, vp=vp, table=table: paged_decode(
                q, kp, vp, table, lengths, backend="cpp"
            )
    err = max((fn() - want).abs().max().item() for fn in calls.values())
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            evict()
            times[name].append(timed(fn))
    t = {name: statistics.median(ts) for name, ts in times.items()}
    kv_bytes = 2 * k.numel() * k.element_size()
    rows = []
    for bs in BLOCK_SIZES:
        rows.append(
            {
                "context": context,
                "block": bs,
                "block K KiB": bs * kv_heads * dim * 4 / 1024,
                "contiguous GB/s": kv_bytes / t["contiguous"] / 1e9,
                "shuffled GB/s": kv_bytes / t[f"{bs} shuffled"] / 1e9,
                "shuffled / contiguous": t["contiguous"] / t[f"{bs} shuffled"],
                "in order / contiguous": t["contiguous"] / t[f"{bs} in order"],
                "max err": err,
            }
        )
    return rows


def engine_steps(contexts, repeats: int) -> list[dict]:
    """Decode steps of SmolLM2-135M at batch 8 through 16- and 64-token paged pools."""
    from attnkit.cache.paged import PagedCache
    from attnkit.models import load_model

    model, _ = load_model()
    c = model.config
    rows = []
    for context in contexts:
        caches = {}
        for bs in (16, 64):
            for name, seed in (("shuffled", 0), ("in order", None)):
                per_seq = -(-(context + repeats + 2) // bs)
                cache = PagedCache(
                    c.num_hidden_layers,
                    c.num_key_value_heads,
                    c.head_dim,
                    num_blocks=BATCH * per_seq,
                    block_size=bs,
                    seed=seed,
                )
                seqs = [cache.add_sequence() for _ in range(BATCH)]
                cache.prepare(seqs, context)
                g = torch.Generator().manual_seed(1)
                shape = (2, BATCH, c.num_key_value_heads, context, c.head_dim)
                for layer in range(c.num_hidden_layers):
                    kv = torch.randn(shape, generator=g)
                    cache.update(layer, kv[0], kv[1])
                caches[(bs, name)] = (cache, seqs)
        ids = torch.randint(0, c.vocab_size, (BATCH, 1), generator=torch.Generator().manual_seed(2))
        times = {key: [] for key in caches}
        with torch.inference_mode():
            for step in range(repeats + 2):
                for key, (cache, seqs) in caches.items():
                    seconds = timed(
                        lambda cache=cache, seqs=seqs, ids=ids: model(
                            ids, cache=cache, seq_ids=seqs
                        )
                    )
                    if step >= 2:  # the first two steps warm the model's kernels up
                        times[key].append(seconds)
        ms = {key: 1e3 * statistics.median(ts) for key, ts in times.items()}
        rows.append(
            {
                "context": context,
                "16 shuffled ms": ms[(16, "shuffled")],
                "64 shuffled ms": ms[(64, "shuffled")],
                "16 in order ms": ms[(16, "in order")],
                "64 in order ms": ms[(64, "in order")],
                "shuffled: 64 speed-up": ms[(16, "shuffled")] / ms[(64, "shuffled")],
                "in order: 64 speed-up": ms[(16, "in order")] / ms[(64, "in order")],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="contexts 1k and 4k")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per call (>= 5)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--engine", action="store_true", help="also SmolLM2 decode steps")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    check_repeats_and_kernel(parser, args)
    console = Console(stderr=args.json, width=200)
    evict = Evictor()
    contexts = (1024, 4096) if args.quick else (1024, 4096, 16384)
    rows = []
    for n in contexts:
        rows += measure(SHAPES[args.shape], n, args.repeats, evict)
        console.print(f"  context {n} done", style="dim")
    heads, kv_heads, dim = SHAPES[args.shape]
    tables = [(f"paged decode by block size, {heads}/{kv_heads} heads, d {dim}", rows)]
    if args.engine:
        tables.append(("SmolLM2-135M decode steps", engine_steps(contexts[:2], args.repeats)))
    if args.json:
        print(json.dumps({title: table for title, table in tables}, indent=1))
        return
    for title, table_rows in tables:
        settings = f"batch {BATCH}, float32, {torch.get_num_threads()} threads"
        console.print(rows_table(f"{title}, {settings}, medians of {args.repeats}", table_rows))


if __name__ == "__main__":
    main()
