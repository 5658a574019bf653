"""The `attnkit bench` command: flags, a progress display, the ratio table or JSON."""

from __future__ import annotations

import argparse
import json
import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from attnkit.tools.bench.core import TARGETS, BenchSettings, Row
from attnkit.tools.bench.run import BenchResult, run_bench


def add_parser(commands, positive) -> None:
    bench = commands.add_parser(
        "bench",
        help="time attnkit's fast paths against torch and the machine's limits",
        description="Run the performance targets on this machine: each row is attnkit's "
        "time against one baseline measured in the same run, as a speed ratio "
        "(baseline time / attnkit time; above 1 is faster), with the target's goal.",
    )
    bench.add_argument("--quick", action="store_true", help="smaller problems (a few minutes)")
    bench.add_argument(
        "--targets",
        default=None,
        help="comma-separated target numbers, "
        + ", ".join(f"{k}: {v}" for k, v in TARGETS.items())
        + " (default: all)",
    )
    bench.add_argument(
        "--repeats", type=positive, default=5, help="timed runs per figure; medians (5)"
    )
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.add_argument(
        "--markdown", action="store_true", help="print a markdown table (benchmarks/RESULTS.md)"
    )
    bench.set_defaults(handler=run)


def settings_from(args: argparse.Namespace) -> BenchSettings:
    targets = tuple(TARGETS)
    if args.targets:
        try:
            targets = tuple(int(t) for t in args.targets.split(",") if t.strip())
        except ValueError:
            targets = ()
        if not targets or not set(targets) <= set(TARGETS):
            raise ValueError(
                f"--targets must be comma-separated numbers from {list(TARGETS)}, "
                f"got {args.targets!r}"
            )
    return BenchSettings(quick=args.quick, repeats=args.repeats, targets=targets)


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True)
    try:
        settings = settings_from(args)
    except ValueError as error:
        console.print(f"[red]attnkit bench: {error}[/red]", soft_wrap=True)
        return 2
    columns = (
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bars:
        task = bars.add_task("measuring the machine", total=None)

        def on_case(case, index, total):
            bars.update(
                task, description=f"{case.target}. {case.name}", completed=index, total=total
            )

        result = run_bench(settings, on_case)
        bars.update(task, description="done", completed=bars.tasks[0].total)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, allow_nan=True))
    elif args.markdown:
        print(markdown(result))
    else:
        print_table(result, Console(width=max(Console().width, 160)))
    return 0


def print_table(result: BenchResult, console: Console) -> None:
    """One row per comparison; notes become numbered footnotes under the table."""
    table = Table(title=f"attnkit bench ({'quick' if result.settings.quick else 'full'} run)")
    for name in ("#", "case", "attnkit ms", "baseline", "baseline ms", "speed", "goal", "met"):
        left = name in ("case", "baseline", "goal")
        table.add_column(name, justify="left" if left else "right", overflow="fold")
    cases, notes = _footnoted(result.rows)
    for row, case in zip(result.rows, cases, strict=True):
        table.add_row(
            str(row.target),
            case,
            _ms(row.attnkit_s),
            row.baseline,
            _ms(row.baseline_s),
            "—" if math.isnan(row.speed) else f"{row.speed:.2f}x",
            row.goal_text,
            {True: "[green]yes[/green]", False: "[red]no[/red]", None: ""}[row.met],
        )
    console.print(table)
    for number, note in enumerate(notes, 1):
        console.print(f"[{number}] {note}", highlight=False)
    console.print(
        f"{result.machine.description}. speed = baseline time / attnkit time (medians of "
        f"{result.settings.repeats}); goal: the least speed the target asks for.",
        highlight=False,
    )


def markdown(result: BenchResult) -> str:
    """The table as markdown, notes as numbered footnotes, and the machine line."""
    lines = [
        "| # | case | attnkit ms | baseline | baseline ms | speed | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cases, notes = _footnoted(result.rows)
    for row, case in zip(result.rows, cases, strict=True):
        speed = "—" if math.isnan(row.speed) else f"{row.speed:.2f}x"
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(
            f"| {row.target} | {case} | {_ms(row.attnkit_s)} | {row.baseline} | "
            f"{_ms(row.baseline_s)} | {speed} | {row.goal_text} | {met} |"
        )
    lines += [""] + [f"[{i}] {note}  " for i, note in enumerate(notes, 1)]
    lines += [
        "",
        f"{result.machine.description}; {result.date}; medians of {result.settings.repeats}.",
    ]
    return "\n".join(lines)


def _footnoted(rows: list[Row]) -> tuple[list[str], list[str]]:
    """Each row's case, with "[n]" where it has a note, and the notes in that order."""
    cases, notes = [], []
    for row in rows:
        if row.note:
            notes.append(row.note)
        cases.append(f"{row.case} [{len(notes)}]" if row.note else row.case)
    return cases, notes


def _ms(seconds: float) -> str:
    return "—" if math.isnan(seconds) else f"{seconds * 1e3:,.1f}"
