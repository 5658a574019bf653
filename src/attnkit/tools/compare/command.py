"""The `attnkit compare` command: settings from flags, a live progress display, the outputs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attnkit.tools.compare.plots import write_plots
from attnkit.tools.compare.report import caption, columns, markdown, results_json, table_rows
from attnkit.tools.compare.run import CompareSettings, run_compare
from attnkit.tools.compare.strategies import GRAMMAR, parse
from attnkit.tools.console import table_console


def add_parser(commands, positive) -> None:
    cmp = commands.add_parser(
        "compare",
        help="measure every KV strategy's memory, perplexity, passkey retrieval and speed",
        description="Run KV strategies (as shipped, MHA, MQA, MLA, windows, sinks, H2O, "
        "int8, RoPE scalings) on a model and the embedded corpus; write report.md, "
        "results.json and plots to --out.",
    )
    cmp.add_argument("--model", default="smollm2-135m", help="known name, .gguf file or HF dir")
    cmp.add_argument(
        "--strategies", default=None, help=f"comma-separated, from: {GRAMMAR} (default: all)"
    )
    cmp.add_argument("--contexts", default=None, help="comma-separated tokens, e.g. 512,2048,8192")
    cmp.add_argument("--quick", action="store_true", help="a reduced set in a few minutes")
    cmp.add_argument("--text", default=None, metavar="FILE", help="evaluate on this text file")
    cmp.add_argument("--segments", type=positive, default=None, help="segments per context")
    cmp.add_argument("--trials", type=positive, default=None, help="passkey trials per cell")
    cmp.add_argument("--seed", type=int, default=0, help="passkey keys' seed (0)")
    cmp.add_argument("--out", default="attnkit-report", help="report folder (./attnkit-report)")
    cmp.add_argument("--json", action="store_true", help="print results.json to stdout")
    cmp.set_defaults(handler=run)


def settings_from(args: argparse.Namespace) -> CompareSettings:
    overrides: dict = {"model": args.model, "seed": args.seed, "text_file": args.text}
    if args.strategies:
        names = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
        for name in names:
            parse(name)  # a typo fails now, not after an hour
        overrides["strategies"] = names
    if args.contexts:
        try:
            contexts = tuple(int(c) for c in args.contexts.split(","))
        except ValueError:
            contexts = ()
        if not contexts or min(contexts) < 1:
            raise ValueError(f"--contexts must be positive integers, got {args.contexts!r}")
        overrides["contexts"] = contexts
    if args.segments:
        overrides["segments"] = args.segments
    if args.trials:
        overrides["passkey_trials"] = args.trials
    return CompareSettings.quick(**overrides) if args.quick else CompareSettings(**overrides)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        settings = settings_from(args)
    except ValueError as error:
        console.print(f"[red]attnkit compare: {error}[/red]", soft_wrap=True)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns_ = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns_, console=console) as bars:
        overall = bars.add_task("strategies", total=len(settings.strategies))
        phase = bars.add_task("loading model", total=None)
        current: list[str] = []

        def progress(name: str, what: str, done: int, total: int) -> None:
            if not current or current[-1] != name:
                if current:
                    bars.advance(overall)
                current.append(name)
                bars.log(f"measuring {name}")  # a line per strategy, also in CI logs
            bars.update(phase, description=f"{name}: {what}", completed=done, total=total)

        try:
            rows, meta = run_compare(settings, progress)
        except ValueError as error:
            console.print(f"[red]attnkit compare: {error}[/red]", soft_wrap=True)
            return 2
        bars.update(overall, completed=len(settings.strategies))
    plots = write_plots(rows, list(settings.contexts), out)
    results = results_json(rows, meta)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "report.md").write_text(markdown(rows, meta, [str(p) for p in plots]))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title="attnkit compare", caption=caption(meta))
    for i, name in enumerate(columns(rows)):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for cells in table_rows(rows):
        table.add_row(*cells)
    console = table_console()
    console.print(table)
    console.print(
        f"report: {out / 'report.md'} · results: {out / 'results.json'} · plots: "
        + ", ".join(str(p) for p in plots)
    )
    return 0
