"""The ratio tables the CPU decode benchmarks print: one rich table of rows of named values."""

from __future__ import annotations

from rich.table import Table


def rows_table(title: str, rows: list[dict]) -> Table:
    """A table with a right-justified column per key of the rows (all alike), a row each."""
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(cell(value) for value in row.values()))
    return table


def cell(value) -> str:
    """Text as it is, integers whole, small numbers in exponent form, others to 2 places."""
    if isinstance(value, (str, int)):
        return str(value)
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.1e}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"
