"""Windowed models through their caches: prefill steps over a window, and decode steps of a
model mixing windowed and global layers, each against the path it replaced.

    PYTHONPATH=src python benchmarks/windowed_models.py [--quick] [--repeats N] [--json]

SmolLM2-135M (float32, 2 threads) with its weights, made windowed through its config:

- **prefill**: one prompt of 8k random tokens (4k with `--quick`), every layer a 512-token
  window, fed in 512-token steps (a ring's `max_new_per_step`, the scheduler's chunk) into
  - a `SlidingWindowCache` ring, each step over the ring's keys gathered in position order
    with the window as a pattern (the banded kernel skips what lies outside it), against
    the same ring read as its slots lie, under a dense mask built from their positions
    (what `ContiguousCache.attend` does, and the ring did before);
  - a `PagedCache` with the window (`new_paged_cache`), each step gathering the blocks its
    window and sinks see, against gathering the sequence's whole block table.
  Times are of the whole prompt; the logits of its last token must agree across the four.
- **decode**: layers alternating a 512-token window and global attention (Gemma 2's
  layout), batch 8 at a 4k context (2k with `--quick`), the K/V random (no prompt run):
  one decode step through the one-call stack (a C++ call per run of consecutive layers of
  one cache group; here one per layer) against the same step layer by layer, each layer
  through its group's own `attend` (a pool decoding in place, a ring over its window in
  position order), and layer by layer through each group's views and a dense mask (what a
  `LayeredCache` did before), for the model's own `new_cache` (`LayeredCache` of rings and
  K/V) and `new_paged_cache` (a pool per kind of layer, 16-token blocks). The same step
  is run each way once (the cache rolled back between) and their logits compared: random
  K/V make float32 rounding show more than a real prompt's would (~1e-2 on logits of ~10).

Each timed call follows a 64 MiB copy that leaves the last-level cache cold; medians of
`--repeats` runs, the calls taken in turn within each run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import statistics

import torch
from rich.console import Console

from attnkit.cache.base import KVCache
from attnkit.cache.contiguous import ContiguousCache
from attnkit.cache.layered import LayeredCache
from attnkit.cache.paged import PagedCache
from attnkit.cache.window import SlidingWindowCache
from attnkit.models import load_model
from attnkit.models.llama import Transformer
from cold_calls import Evictor, check_repeats_and_kernel, timed
from tables import rows_table

WINDOW, CHUNK, BATCH, BLOCK = 512, 512, 8, 16


def windowed(base: Transformer, layer_types=None) -> Transformer:
    """`base` with a 512-token window on every layer, or on the `layer_types` that say so."""
    config = dataclasses.replace(base.config, sliding_window=WINDOW, layer_types=layer_types)
    model = Transformer(config).eval()
    model.load_state_dict(base.state_dict())
    return model


@contextlib.contextmanager
def replaced(owner, name: str, value):
    """`owner.name` is `value` inside the block (the path a cache took before)."""
    saved = owner.__dict__[name] if name in owner.__dict__ else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def prefill_rows(base: Transformer, tokens: int, repeats: int, evict) -> list[dict]:
    model = windowed(base)
    ids = torch.randint(
        0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)
    )
    blocks = tokens // BLOCK + 4

    def prefill(make_cache):
        cache = make_cache()
        seq = cache.sequences[0] if cache.sequences else cache.add_sequence()
        with torch.inference_mode():
            for start in range(0, tokens, CHUNK):
                out = model(
                    ids[:, start : start + CHUNK], cache=cache, seq_ids=[seq], last_only=True
                )
        return out[0, -1]

    ring = lambda: model.new_cache(1, max_new_per_step=CHUNK)  # noqa: E731
    pool = lambda: model.new_paged_cache(blocks, BLOCK, seed=0)  # noqa: E731
    ways = {
        "ring, window as a pattern": lambda: prefill(ring),
        "ring, dense mask over its slots": lambda: _with(
            replaced(SlidingWindowCache, "attend", ContiguousCache.attend), prefill, ring
        ),
        "paged, the window's blocks": lambda: prefill(pool),
        "paged, the whole table": lambda: _with(
            replaced(PagedCache, "_window_span", lambda self, seen: None), prefill, pool
        ),
    }
    logits = {name: way() for name, way in ways.items()}  # warm up, and the answers
    first = next(iter(logits.values()))
    diff = max((row - first).abs().max().item() for row in logits.values())
    seconds = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():
            evict()
            seconds[name].append(timed(way))
    s = {name: statistics.median(ts) for name, ts in seconds.items()}
    return [
        {
            "cache": cache,
            "tokens": tokens,
            "new s": s[new],
            "before s": s[old],
            "new / before speed": s[old] / s[new],
            "max logit diff (all four)": diff,
        }
        for cache, new, old in (
            ("ring", "ring, window as a pattern", "ring, dense mask over its slots"),
            ("paged", "paged, the window's blocks", "paged, the whole table"),
        )
    ]


def _with(context, fn, *args):
    with context:
        return fn(*args)


def decode_rows(base: Transformer, context: int, repeats: int, evict) -> list[dict]:
    n_layers = base.config.num_hidden_layers
    types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    model = windowed(base, types)
    c = model.config
    blocks = BATCH * -(-(context + 2 * repeats + 4) // BLOCK)
    caches = {
        "rings + K/V (new_cache)": model.new_cache(BATCH),
        "two pools (new_paged_cache)": model.new_paged_cache(blocks, BLOCK, seed=0),
    }
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(n_layers, 2, BATCH, c.num_key_value_heads, CHUNK, c.head_dim, generator=g)
    for cache in caches.values():
        seqs = cache.sequences or [cache.add_sequence() for _ in range(BATCH)]
        for _ in range(0, context, CHUNK):  # random K/V, a chunk at a time
            cache.prepare(seqs, CHUNK)
            for layer in range(n_layers):
                cache.update(layer, *kv[layer])
    ids = torch.randint(0, c.vocab_size, (BATCH, 1), generator=g)
    stacked = model._stacked_decode

    def step(cache, way: str):
        model._stacked_decode = stacked if way == "one call" else (lambda *args: None)
        routed = LayeredCache.attend if way != "views + mask" else KVCache.attend
        try:
            with replaced(LayeredCache, "attend", routed), torch.inference_mode():
                return model(ids, cache=cache)
        finally:
            model._stacked_decode = stacked

    rows = []
    ways = ("one call", "layer by layer", "views + mask")
    for name, cache in caches.items():
        logits = {}
        for way in ways:  # the same step each way (and the stacks built)
            logits[way] = step(cache, way)
            for seq in cache.sequences:
                cache.truncate(seq, cache.length(seq) - 1)
        times = {way: [] for way in ways}
        for _ in range(repeats):  # each step adds a token: every way sees about one length
            for way in ways:
                evict()
                times[way].append(timed(functools.partial(step, cache, way)))
        ms = {way: 1e3 * statistics.median(ts) for way, ts in times.items()}
        rows.append(
            {
                "cache": name,
                "context": context,
                "one call ms": ms["one call"],
                "layer by layer ms": ms["layer by layer"],
                "views + mask ms": ms["views + mask"],
                "one call / layers speed": ms["layer by layer"] / ms["one call"],
                "one call / views speed": ms["views + mask"] / ms["one call"],
                "max logit diff": max(
                    (logits[way] - logits["one call"]).abs().max().item() for way in ways
                ),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4k prompt, a 2k context")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per call (>= 5)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    check_repeats_and_kernel(parser, args)
    console = Console(stderr=args.json, width=220)
    evict = Evictor()
    base, _ = load_model()
    tokens, context = (4096, 2048) if args.quick else (8192, 4096)
    settings = f"float32, {torch.get_num_threads()} threads, medians of {args.repeats}"
    prefill = prefill_rows(base, tokens, args.repeats, evict)
    console.print("  prefill done", style="dim")
    decode = decode_rows(base, context, args.repeats, evict)
    tables = [
        (f"SmolLM2-135M, window {WINDOW} on every layer: a prompt in {CHUNK}-token steps, "
         f"{settings}", prefill),
        (f"SmolLM2-135M, alternating window-{WINDOW} and global layers: a decode step, "
         f"batch {BATCH}, {settings}", decode),
    ]  # fmt: skip
    if args.json:
        print(json.dumps({title: rows for title, rows in tables}, indent=2))
    else:
        for title, rows in tables:
            console.print(rows_table(title, rows))


if __name__ == "__main__":
    main()
