"""Attention backends on this machine, each as a ratio to torch SDPA measured in the same run.

    python benchmarks/attention.py            # full: N = 1k, 4k, 16k (several minutes on 2 cores)
    python benchmarks/attention.py --quick    # N = 1k, 4k
    python benchmarks/attention.py --markdown # tables for benchmarks/RESULTS.md

Prefill: float32, batch 1, 8 query heads (MHA: 8 KV heads, GQA: 2), head dim 64; causal
and sliding window 512. Baselines: torch SDPA as attnkit's `sdpa` backend calls it
(`is_causal` for causal, a dense boolean mask otherwise, `enable_gqa` for GQA), torch SDPA
on K/V repeated to full heads, and the window's ideal: SDPA causal time x the share of
(query, key) pairs the window keeps. Decode: batch 8, 32 query / 8 KV heads, head dim 128,
one new token against 4096 cached; the floor is the K/V bytes read divided by this
machine's copy bandwidth, measured in the same run. Speed ratios > 1 mean faster than the
baseline. Every figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.tools.bench.core import Machine, Timer
from attnkit.tools.measure import median_seconds, peak_bytes

WINDOW = 512


def copy_bandwidth(repeats: int) -> float:
    """Bytes moved per second (read + write) by a large tensor copy: the memory roofline."""
    return Machine.copy_rate(Timer(repeats))


def prefill_rows(n: int, heads: int, kv_heads: int, repeats: int):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, heads, n, 64, generator=gen)
    k = torch.randn(1, kv_heads, n, 64, generator=gen)
    v = torch.randn(1, kv_heads, n, 64, generator=gen)
    k_full, v_full = (t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    layout = "MHA" if heads == kv_heads else "GQA"

    def timed(fn) -> float:
        return median_seconds(fn, repeats=repeats)

    causal_sdpa = timed(lambda: attnkit.attention(q, k, v, masks.causal(), backend="sdpa"))
    for name, mask in (
        ("causal", masks.causal()),
        (f"window {WINDOW}", masks.sliding_window(WINDOW)),
    ):
        sdpa = (
            causal_sdpa
            if name == "causal"
            else timed(lambda mask=mask: attnkit.attention(q, k, v, mask, backend="sdpa"))
        )
        contenders = {
            "auto": lambda mask=mask: attnkit.attention(q, k, v, mask),
            "tiled": lambda mask=mask: attnkit.attention(q, k, v, mask, backend="tiled"),
        }
        if name != "causal":
            contenders["gathered"] = lambda mask=mask: attnkit.attention(
                q, k, v, mask, backend="gathered"
            )
        if layout == "GQA" and name == "causal":
            contenders["torch SDPA, K/V repeated"] = lambda: F.scaled_dot_product_attention(
                q, k_full, v_full, is_causal=True
            )
        if n <= 4096:  # the materialised oracle needs O(N²) memory
            contenders["reference"] = lambda mask=mask: attnkit.attention(
                q, k, v, mask, backend="reference"
            )
        row = {"case": f"prefill {layout} N={n} {name}", "sdpa_ms": sdpa * 1e3}
        for label, fn in contenders.items():
            row[label] = sdpa / timed(fn)
        if name != "causal":
            pairs = min(WINDOW, n) * n - min(WINDOW, n) * (min(WINDOW, n) - 1) / 2
            ideal = causal_sdpa * pairs / (n * (n + 1) / 2)
            row["ideal (causal x kept share)"] = sdpa / ideal
        yield row


def decode_rows(repeats: int, bandwidth: float):
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, context, dim = 8, 32, 8, 4096, 128
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k = torch.randn(batch, kv_heads, context, dim, generator=gen)
    v = torch.randn(batch, kv_heads, context, dim, generator=gen)
    sdpa = median_seconds(lambda: attnkit.attention(q, k, v, backend="sdpa"), repeats=repeats)
    floor = (k.numel() + v.numel()) * 4 / bandwidth  # every K/V byte moved once at copy speed
    row = {"case": "decode GQA b=8 ctx=4096", "sdpa_ms": sdpa * 1e3}
    contenders = {
        "auto": lambda: attnkit.attention(q, k, v),
        "tiled": lambda: attnkit.attention(q, k, v, backend="tiled"),
        "torch SDPA enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    for label, fn in contenders.items():
        row[label] = sdpa / median_seconds(fn, repeats=repeats)
    row["bandwidth floor"] = sdpa / floor
    yield row


def memory_rows(sizes: list[int]):
    for n in sizes:
        q = torch.randn(1, 8, n, 64)
        row = {"case": f"peak memory N={n} causal (MiB)"}
        for backend in ("tiled", "sdpa") + (("reference",) if n <= 4096 else ()):
            row[backend] = (
                peak_bytes(
                    lambda backend=backend, q=q: attnkit.attention(
                        q, q, q, masks.causal(), backend=backend
                    )
                )
                / 2**20
            )
        yield row


def render(title: str, rows: list[dict], markdown: bool, console: Console, unit: str) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    if markdown:
        print(f"\n### {title}\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(_cell(row.get(c), c, unit) for c in columns) + " |")
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "case" else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(c), c, unit) for c in columns))
    console.print(table)


def _cell(value, column: str, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if column.endswith("_ms"):
        return f"{value:.1f}"
    return f"{value:.2f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1k and 4k only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    sizes = [1024, 4096] if args.quick else [1024, 4096, 16384]
    console = Console(stderr=True)
    results: dict[str, list[dict]] = {}
    with console.status("measuring…") as status:
        status.update("copy bandwidth")
        bandwidth = copy_bandwidth(args.repeats)
        results["prefill"] = []
        for n in sizes:
            for heads, kv_heads in ((8, 8), (8, 2)):
                status.update(f"prefill N={n} heads {heads}/{kv_heads}")
                results["prefill"].extend(prefill_rows(n, heads, kv_heads, args.repeats))
        status.update("decode")
        results["decode"] = list(decode_rows(args.repeats, bandwidth))
        status.update("peak memory")
        results["memory"] = list(memory_rows(sizes))
    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "attnkit": attnkit.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps({"meta": meta} | results, indent=2))
        return
    if args.markdown:
        print(f"\n{meta}")
    else:
        console.print(meta)
    out = Console()
    render(
        "Prefill: speed vs torch SDPA (x, higher is faster)",
        results["prefill"],
        args.markdown,
        out,
        "x",
    )
    render(
        "Decode: speed vs torch SDPA (x, higher is faster)",
        results["decode"],
        args.markdown,
        out,
        "x",
    )
    render("Peak memory (MiB)", results["memory"], args.markdown, out, "")


if __name__ == "__main__":
    main()
