"""The console the command line's result tables print to."""

from __future__ import annotations

from rich.console import Console


def table_console(width: int = 140) -> Console:
    """Standard output's console; where it is not a terminal (a pipe, a file, a CI log), one
    `width` columns wide: rich would fall back to 80 there and cut the headers short."""
    console = Console()
    return console if console.is_terminal else Console(width=width)
