"""The `attnkit` command: thin parsing and printing over attnkit.tools."""

from __future__ import annotations

import argparse
import json
import sys

import torch
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit.tools.console import table_console


def _demo(args: argparse.Namespace) -> int:
    from attnkit.tools.demo import run_demo

    console = Console(stderr=True)
    rows = []
    with console.status("timing backends…"):
        for row in run_demo(seq_len=args.seq_len, window=args.window, repeats=args.repeats):
            rows.append(row)
            console.log(f"{row.mask:>22}  {row.backend:<16} {row.milliseconds:9.1f} ms")
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    table = Table(
        title=f"attnkit.attention: prefill of {args.seq_len} tokens, 9 query / 3 KV heads, "
        f"head dim 64, float32, torch {torch.__version__}",
        caption="err: max |output - float64 reference|; vs sdpa: speed relative to torch SDPA",
    )
    for column in ("mask", "backend", "ms", "vs sdpa", "err", "peak MiB"):
        label = column in ("mask", "backend")
        table.add_column(column, justify="left" if label else "right", no_wrap=label)
    for r in rows:
        table.add_row(
            r.mask,
            r.backend,
            f"{r.milliseconds:.1f}",
            f"{r.speed_vs_sdpa:.2f}x",
            f"{r.max_abs_error:.1e}",
            f"{r.peak_mib:.1f}",
        )
    table_console().print(table)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from attnkit.engine import GenerationStats, generate
    from attnkit.models import load_model

    console = Console(stderr=True)
    with console.status(f"loading {args.model}…"):
        model, tokenizer = load_model(args.model)
    stats = GenerationStats()

    def stream(_index: int, _token: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(
        model,
        tokenizer,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        chat=not args.no_chat,
        stream=stream,
        stats=stats,
    )
    sys.stdout.write("\n")
    console.print(
        f"[dim]prefill {stats.prefill_tokens} tokens at {stats.prefill_tokens_per_second:.0f} "
        f"tokens/s · decode {stats.decode_tokens} tokens at "
        f"{stats.decode_tokens_per_second:.1f} tokens/s[/dim]"
    )
    return 0


def _memory(args: argparse.Namespace) -> int:
    from attnkit.tools import memory_tables as tables
    from attnkit.tools.memory_plot import PLOT_MAX_CONTEXT, plot_memory
    from attnkit.tools.memory_report import memory_report, parse_size
    from attnkit.tools.presets import load_spec

    try:
        specs = [load_spec(model) for model in args.model]
        gpu = None if args.gpu_memory is None else parse_size(args.gpu_memory)
        reports = [
            memory_report(
                spec,
                context=args.context,
                batch=args.batch,
                dtype=args.dtype,
                gpu_bytes=gpu,
                weights_dtype=args.weights_dtype,
                image_tokens=args.image_tokens,
                variants=args.variant,
            )
            for spec in specs
        ]
        if args.plot is not None:
            longest = max(PLOT_MAX_CONTEXT, args.context + args.image_tokens)
            plot_memory(
                specs, args.plot, dtype=args.dtype, variants=args.variant, max_context=longest
            )
    except (ValueError, OSError) as error:
        Console(stderr=True).print(f"[red]attnkit memory: {error}[/red]")
        return 2
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return 0
    console = table_console()
    if len(reports) == 1:
        console.print(tables.summary_table(reports[0]))
    else:
        console.print(tables.models_table(reports))
    for report in reports:
        console.print(tables.windowed_line(report))
        console.print(tables.what_if_table(report))
    if args.plot is not None:
        console.print(f"plot written to {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnkit",
        description="The attention family for transformers: one API, masks, backends, RoPE, "
        "and tools that measure each variant's memory, speed and quality.",
    )
    parser.add_argument("--version", action="version", version=f"attnkit {attnkit.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="time every attention backend on a SmolLM2-sized problem and print a table"
    )
    demo.add_argument("--seq-len", type=_positive, default=2048, help="tokens (default 2048)")
    demo.add_argument("--window", type=_positive, default=256, help="sliding window (256)")
    demo.add_argument("--repeats", type=_positive, default=3, help="timed runs per cell (3)")
    demo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    demo.set_defaults(handler=_demo)

    gen = commands.add_parser("generate", help="generate text with a model, streaming tokens")
    gen.add_argument("prompt", help="the prompt (wrapped in the chat template unless --no-chat)")
    gen.add_argument("--model", default="smollm2-135m", help="known name, .gguf file or HF dir")
    gen.add_argument("--max-new-tokens", type=_positive, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=_positive, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="use the prompt as raw text")
    gen.set_defaults(handler=_generate)

    mem = commands.add_parser(
        "memory", help="predict KV-cache and weights memory of a model, with what-if variants"
    )
    mem.add_argument(
        "model", nargs="+", help="preset names, config.json files (or their directories), .gguf"
    )
    mem.add_argument("--context", type=_positive, default=8192, help="tokens per request (8192)")
    mem.add_argument("--batch", type=_positive, default=1, help="concurrent requests (1)")
    kv_dtypes = ("bf16", "fp16", "fp8", "int8", "int4", "fp32")
    mem.add_argument("--dtype", choices=kv_dtypes, default="bf16", help="KV dtype (bf16)")
    mem.add_argument("--weights-dtype", choices=kv_dtypes, default="bf16", help="(bf16)")
    mem.add_argument("--gpu-memory", default=None, help="e.g. 80GB or 24GiB: report the limits")
    mem.add_argument(
        "--variant",
        action="append",
        default=None,
        metavar="V",
        help="what-if variant, repeatable: mha, mqa, gqa:KV_HEADS, mla:RANK, window:W, "
        "window-alternating:W, kv:DTYPE (default: a standard table)",
    )
    mem.add_argument(
        "--image-tokens", type=_non_negative, default=0, help="visual tokens per request (0)"
    )
    mem.add_argument("--plot", default=None, metavar="FILE.png", help="KV GiB vs context plot")
    mem.add_argument(
        "--json", action="store_true", help="print JSON (a list for several models) instead"
    )
    mem.set_defaults(handler=_memory)

    from attnkit.tools.compare.command import add_parser as add_compare

    add_compare(commands, _positive)

    from attnkit.tools.bench.command import add_parser as add_bench

    add_bench(commands, _positive)
    return parser


def _int_at_least(minimum: int):
    """An argparse type: an integer >= `minimum`, with a message saying so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            shown = repr(text) if value is None else value
            raise argparse.ArgumentTypeError(f"expected {_ALLOWED[minimum]}, got {shown}")
        return value

    return parse


_ALLOWED = {1: "a positive integer", 0: "an integer >= 0"}
_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
