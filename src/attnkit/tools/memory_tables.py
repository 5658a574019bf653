"""Rich tables of `memory_report` dicts, as `attnkit memory` prints them."""

from __future__ import annotations

from rich import box
from rich.table import Table


def size(n: int | None) -> str:
    """Bytes in TiB/GiB/MiB/KiB (powers of two), or 'unknown'."""
    if n is None:
        return "unknown"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,} B"


def _longest(r: dict) -> str:
    if r["gpu_bytes"] is None:
        return "-"
    return "unbounded" if r["max_context_unbounded"] else f"{r['max_context']:,}"


def windowed_line(r: dict) -> str:
    """How many layers a sliding window caps, e.g. '21 of 42 layers windowed (W = 4096)'."""
    layers = len(r["per_layer_bytes_per_token"])
    if not r["windowed_layers"]:
        return f"{r['model']}: 0 of {layers} layers windowed (every layer caches all tokens)"
    return (
        f"{r['model']}: {r['windowed_layers']} of {layers} layers windowed "
        f"(W = {r['spec']['window']:,})"
    )


def summary_table(r: dict) -> Table:
    """One model's figures, one per row."""
    table = Table(title=f"{r['model']}: KV cache ({r['dtype']}) and weights ({r['weights_dtype']})")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("KV bytes per token, per layer", f"{r['kv_bytes_per_token_per_layer']:,}")
    table.add_row("KV bytes per token, all layers (uncapped)", f"{r['kv_bytes_per_token']:,}")
    tokens = f"{r['context']:,} tokens"
    if r["image_tokens"]:
        tokens = f"{r['context']:,} text + {r['image_tokens']:,} image tokens"
    table.add_row(f"KV per request at {tokens}", size(r["kv_bytes_per_request"]))
    table.add_row(f"KV for a batch of {r['batch']}", size(r["kv_bytes_batch"]))
    table.add_row("weights", size(r["weights_bytes"]))
    if r["gpu_bytes"] is not None:
        table.add_row(f"max requests at {r['tokens_per_request']:,} tokens", f"{r['max_batch']:,}")
        table.add_row(f"max context for a batch of {r['batch']}", _longest(r))
    return table


def models_table(reports: list[dict]) -> Table:
    """One row per model: the summary figures side by side."""
    r0 = reports[0]
    tokens = f"{r0['context']:,}"
    if r0["image_tokens"]:
        tokens += f" + {r0['image_tokens']:,} image"
    table = Table(
        title=f"KV cache ({r0['dtype']}) at {tokens} tokens per request, batch {r0['batch']}",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    columns = ("model", "B/token", "request", "batch", "weights", "max reqs", "max context")
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)
    for r in reports:
        table.add_row(
            r["model"],
            f"{r['kv_bytes_per_token']:,}",
            size(r["kv_bytes_per_request"]),
            size(r["kv_bytes_batch"]),
            size(r["weights_bytes"]),
            "-" if r["max_batch"] is None else f"{r['max_batch']:,}",
            _longest(r),
        )
    return table


def what_if_table(r: dict) -> Table:
    """One model's what-if rows."""
    title = f"{r['model']}: what if, at {r['tokens_per_request']:,} tokens per request"
    table = Table(title=title)
    for column in ("variant", "KV dtype", "bytes/token", "per request", "saving"):
        label = column == "variant"
        table.add_column(column, justify="left" if label else "right", no_wrap=label)
    for row in r["what_if"]:
        table.add_row(
            row["variant"],
            row["dtype"],
            f"{row['kv_bytes_per_token']:,}",
            size(row["kv_bytes_per_request"]),
            f"{row['saving']:.2f}x",
        )
    return table
