"""Decoding a sliding window from a paged pool: the window's tokens only, not the history.

    PYTHONPATH=src python benchmarks/paged_window.py [--quick] [--repeats N] [--engine] [--serve]

One new query per sequence, batch 8, float32, a window of 512 tokens plus 4 sinks
(StreamingLLM's layout; Mistral's without the sinks), SmolLM2-135M's attention shape (9/3
heads, d 64) and GQA 32/8 d128, in a pool of 16-token blocks in random order. In the same
run and from cold caches it times:

- `window`: `paged_decode(..., backend="cpp", window=512, sinks=4)`, which reads the window's
  and the sinks' blocks through the table and nothing else;
- `gather + mask`: what a windowed layer's decode step through a `PagedCache` did before:
  every block of the sequence gathered into contiguous K/V (`PagedCache.update`), then
  `attnkit.attention(..., sliding_window(512) | sinks(4))` with the `auto` backend;
- `contiguous`: `decode_attention(..., backend="cpp")` on the same keys (sinks and window)
  in a contiguous cache, the kernel's rate on those bytes without a block table;
- `whole history`: `paged_decode(..., backend="cpp")` without a window, for scale;
- the memory-bandwidth floor: the window's and sinks' K/V bytes at the copy bandwidth of a
  64 MiB copy timed in the same run.

`--engine` adds whole decode steps of SmolLM2-135M (batch 8) at a 4k context with a 512
window over full-attention layers (the cache's window), through a `PagedCache(window=512)`
whose blocks behind the window went back to the pool, against a `SlidingWindowCache` ring
(what `generate` uses for windowed layers; the same keys) and a `PagedCache` keeping every
token (`whole history`: more keys, for scale). The K/V are random (no prompt was run), which
makes the float32 logits' rounding differences between caches larger than a real prompt's;
in float64 the two window caches agree to 1e-12 (tests/models/test_stacked_decode.py).

`--serve` runs 16 requests through the continuous-batching scheduler on SmolLM2-135M made
windowed (`sliding_window=64` in its config), in a pool of 128 blocks of 16, a quarter of
the requests' tokens: a pool with the model's window against one keeping every token
(which must preempt), medians of 3; their greedy outputs must agree.

Each timed call follows a 64 MiB copy, which leaves the last-level cache cold. Times are
medians of `--repeats` runs, the calls taken in turn within each run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rich.console import Console

from attnkit import attention
from attnkit.ops.decode_attention import decode_attention
from attnkit.ops.masks import sinks, sliding_window
from attnkit.ops.paged_decode import paged_decode
from cold_calls import Evictor, check_repeats_and_kernel, timed
from tables import rows_table

SHAPES = {"smollm2 9/3 d64": (9, 3, 64), "gqa 32/8 d128": (32, 8, 128)}
BATCH, BLOCK, WINDOW, SINKS = 8, 16, 512, 4


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim): a cache's first arguments for a model of `config`."""
    return config.num_hidden_layers, config.num_key_value_heads, config.head_dim


def medians(calls: dict, repeats: int, evict) -> dict[str, float]:
    """Median seconds of each call, the calls taken in turn, each after `evict()`."""
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            evict()
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(name: str, context: int, repeats: int, evict: Evictor) -> dict:
    heads, kv_heads, dim = SHAPES[name]
    g = torch.Generator().manual_seed(context)
    blocks = BATCH * context // BLOCK
    k_pool = torch.randn(blocks, BLOCK, kv_heads, dim, generator=g)
    v_pool = torch.randn(blocks, BLOCK, kv_heads, dim, generator=g)
    table = torch.randperm(blocks, generator=g).view(BATCH, -1)
    lengths = torch.full((BATCH,), context)
    q = torch.randn(BATCH, heads, dim, generator=g)
    pattern = sliding_window(WINDOW) | sinks(SINKS)

    def gather_and_mask():
        k, v = (p[table].flatten(1, 2).transpose(1, 2) for p in (k_pool, v_pool))
        return attention(q.unsqueeze(2), k, v, pattern).squeeze(2)

    seen = torch.cat([torch.arange(SINKS), torch.arange(context - WINDOW, context)])
    k_seen, v_seen = (
        p[table].flatten(1, 2)[:, seen].transpose(1, 2).contiguous() for p in (k_pool, v_pool)
    )
    calls = {
        "contiguous": lambda: decode_attention(q, k_seen, v_seen, backend="cpp"),
        "window": lambda: paged_decode(
            q, k_pool, v_pool, table, lengths, backend="cpp", window=WINDOW, sinks=SINKS
        ),
        "gather + mask": gather_and_mask,
        "whole history": lambda: paged_decode(q, k_pool, v_pool, table, lengths, backend="cpp"),
    }
    want = paged_decode(
        *(t.double() for t in (q, k_pool, v_pool)), table, lengths, backend="torch",
        window=WINDOW, sinks=SINKS,
    )  # fmt: skip
    err = max(
        (calls[c]() - want).abs().max().item() for c in ("window", "gather + mask", "contiguous")
    )
    t = medians(calls, repeats, evict)
    seen_bytes = 2 * BATCH * (WINDOW + SINKS) * kv_heads * dim * 4
    floor = seen_bytes / evict.bandwidth(5)
    return {
        "shape": name,
        "context": context,
        "window us": 1e6 * t["window"],
        "gather + mask us": 1e6 * t["gather + mask"],
        "whole history us": 1e6 * t["whole history"],
        "floor us": 1e6 * floor,
        "contiguous us": 1e6 * t["contiguous"],
        "window / gather + mask speed": t["gather + mask"] / t["window"],
        "window / contiguous speed": t["contiguous"] / t["window"],
        "window / floor speed": floor / t["window"],
        "window / history speed": t["whole history"] / t["window"],
        "max err": err,
    }


def engine_steps(context: int, repeats: int, evict) -> list[dict]:
    """SmolLM2-135M decode steps at batch 8 with a 512-token window, three caches."""
    from attnkit.cache import SlidingWindowCache
    from attnkit.models import load_model

    model, _ = load_model()
    c = model.config
    shape = kv_shape(c)
    blocks = BATCH * -(-(context + repeats + 4) // BLOCK)
    caches = {
        "paged, window": model.new_paged_cache(blocks, BLOCK, window=WINDOW, seed=0),
        "ring": SlidingWindowCache(*shape, window=WINDOW, max_seqs=BATCH),
        "paged, whole history": model.new_paged_cache(blocks, BLOCK, seed=0),
    }
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(c.num_hidden_layers, 2, BATCH, c.num_key_value_heads, context, c.head_dim)
    for cache in caches.values():
        seqs = [cache.add_sequence() for _ in range(BATCH)]
        for start in range(0, context, 512):  # the ring takes 512 tokens a step
            n = min(512, context - start)
            cache.prepare(seqs, n)
            for layer in range(c.num_hidden_layers):
                cache.update(layer, *kv[layer, :, :, :, start : start + n])
    ids = torch.randint(0, c.vocab_size, (BATCH, 1), generator=g)
    times = {name: [] for name in caches}
    logits = {}
    with torch.inference_mode():
        for step in range(repeats + 2):
            for name, cache in caches.items():
                evict()
                start = time.perf_counter()
                logits[name] = model(ids, cache=cache)
                if step >= 2:  # the first two steps warm the model's kernels up
                    times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    return [
        {
            "context": context,
            "paged window ms": ms["paged, window"],
            "ring ms": ms["ring"],
            "whole history ms": ms["paged, whole history"],
            "paged window / ring speed": ms["ring"] / ms["paged, window"],
            "paged window / history speed": ms["paged, whole history"] / ms["paged, window"],
            "blocks held (window)": caches["paged, window"].pool.num_used,
            "blocks held (history)": caches["paged, whole history"].pool.num_used,
            "max logit diff vs ring": (logits["paged, window"] - logits["ring"]).abs().max().item(),
        }
    ]


def serve_rows(repeats: int) -> list[dict]:
    """Continuous batching of 16 requests through SmolLM2-135M made windowed (its config's
    `sliding_window=64`), prompts of 100-200 tokens and answers of 64-128, in a pool of 128
    blocks of 16 (a quarter of the requests' tokens): a pool with the model's window
    (`new_paged_cache`) against one keeping every token. Greedy outputs must agree."""
    import dataclasses

    from attnkit.cache.paged import PagedCache
    from attnkit.engine.scheduler import Scheduler
    from attnkit.models import load_model
    from attnkit.models.llama import Transformer
    from attnkit.tools.bench.endtoend import sample_prompts

    base, tokenizer = load_model()
    model = Transformer(dataclasses.replace(base.config, sliding_window=64)).eval()
    model.load_state_dict(base.state_dict())
    c, pool = model.config, 128
    prompts = sample_prompts(tokenizer, 16, seed=3, lengths=(100, 200))
    answers = torch.randint(64, 128, (16,), generator=torch.Generator().manual_seed(3)).tolist()

    def serve(windowed: bool):
        cache = (
            model.new_paged_cache(pool, BLOCK)
            if windowed
            else PagedCache(*kv_shape(c), num_blocks=pool, block_size=BLOCK)
        )
        scheduler = Scheduler(model, cache, max_batch=16)
        handles = [scheduler.add(p, n) for p, n in zip(prompts, answers, strict=True)]
        peak = 0
        start = time.perf_counter()
        while scheduler.waiting or scheduler.running:
            scheduler.step()
            peak = max(peak, cache.pool.num_used)
        seconds = time.perf_counter() - start
        return seconds, handles, peak

    runs = {True: [], False: []}
    for _ in range(repeats):
        for windowed in (True, False):
            runs[windowed].append(serve(windowed))
    (_, window_out, window_peak), (_, all_out, all_peak) = runs[True][0], runs[False][0]
    assert [h.token_ids for h in window_out] == [h.token_ids for h in all_out]
    tokens = sum(answers)
    window_s, all_s = (statistics.median(r[0] for r in runs[w]) for w in (True, False))
    return [
        {
            "requests": len(prompts),
            "new tokens": tokens,
            "pool blocks": pool,
            "window tok/s": tokens / window_s,
            "every token tok/s": tokens / all_s,
            "window / every token speed": all_s / window_s,
            "preemptions (window)": sum(h.preemptions for h in window_out),
            "preemptions (every token)": sum(h.preemptions for h in all_out),
            "peak blocks (window)": window_peak,
            "peak blocks (every token)": all_peak,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="context 4k only")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per call (>= 5)")
    parser.add_argument("--engine", action="store_true", help="also SmolLM2 decode steps")
    parser.add_argument("--serve", action="store_true", help="also the scheduler's throughput")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    check_repeats_and_kernel(parser, args)
    console = Console(stderr=args.json, width=220)
    evict = Evictor()

    contexts = (4096,) if args.quick else (4096, 16384)
    rows = []
    for name in SHAPES:
        for n in contexts:
            rows.append(measure(name, n, args.repeats, evict))
            console.print(f"  {name} context {n} done", style="dim")
    settings = f"float32, {torch.get_num_threads()} threads"
    each = f"batch {BATCH}, {settings}, medians of {args.repeats}"
    title = f"paged decode, window {WINDOW} + {SINKS} sinks, blocks of {BLOCK} shuffled, {each}"
    tables = [(title, rows)]
    if args.engine:
        steps = engine_steps(4096, args.repeats, evict)
        tables.append((f"SmolLM2-135M decode steps, window {WINDOW}, {each}", steps))
    if args.serve:
        title = f"continuous batching, SmolLM2-135M with window 64, {settings}, medians of 3"
        tables.append((title, serve_rows(3)))
    if args.json:
        print(json.dumps({title: table for title, table in tables}, indent=1))
        return
    for title, table_rows in tables:
        console.print(rows_table(title, table_rows))


if __name__ == "__main__":
    main()
