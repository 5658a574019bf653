"""The console the command line's result tables print to."""

from __future__ import annotations

import os

from rich.console import Console


def table_console(width: int = 140) -> Console:
    """Standard output's console; where it is no terminal (a pipe, a file, a CI log, even
    one that forces colour) and `COLUMNS` is not set, one `width` columns wide: rich would
    fall back to 80 there and cut the headers short."""
    console = Console()
    if console.file.isatty() or "COLUMNS" in os.environ:
        return console
    return Console(width=width)
