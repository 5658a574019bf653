"""The comparison as a table (terminal and markdown) and as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

from attnkit.tools.compare.run import StrategyResult


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def columns(rows: list[StrategyResult]) -> list[str]:
    contexts = sorted({c for r in rows for c in r.contexts})
    return [
        "strategy",
        "KV bytes/token",
        "saving",
        *[f"ppl@{c}" for c in contexts],
        "passkey",
        "prefill ms",
        "decode tok/s",
    ]


def table_rows(rows: list[StrategyResult]) -> list[list[str]]:
    """One list of cells per strategy; savings are against the `shipped` row when present."""
    contexts = sorted({c for r in rows for c in r.contexts})
    shipped = next((r for r in rows if r.name == "shipped"), None)
    out = []
    for r in rows:
        saving = "—"
        if shipped is not None:
            saving = f"{shipped.kv_bytes_per_token / r.kv_bytes_per_token:.2f}x"
        ppl = [f"{r.perplexity[c]:.2f}" if c in r.perplexity else "—" for c in contexts]
        check = "" if r.memory_check else " (!)"
        out.append(
            [
                r.label,
                f"{_size(r.kv_bytes_per_token)}{check}",
                saving,
                *ppl,
                f"{r.passkey['overall']:.0%}" if r.passkey else "—",
                f"{r.prefill_seconds * 1e3:.0f}" if not math.isnan(r.prefill_seconds) else "—",
                f"{r.decode_tokens_per_second:.1f}",
            ]
        )
    return out


def caption(meta: dict) -> str:
    s = meta["settings"]
    contexts = ", ".join(str(c) for c in s["contexts"])
    passkey = (
        f"passkey: {s['passkey_trials']} key(s) per cell at lengths {s['passkey_lengths']} x "
        f"depths {s['passkey_depths']}"
    )
    ppl_rope, key_rope = "", ""
    if any(name.startswith("rope:") for name in s["strategies"]):
        ppl_rope = f" (RoPE rows also at {s['extension_context']})"
        key_rope = (
            f"; RoPE rows only past the training length, at {s['passkey_extension_length']} x "
            f"{s['passkey_extension_depths']}"
        )
    return (
        f"{s['model']} ({meta['dtype']}); perplexity at {contexts}{ppl_rope}: the first C "
        f"tokens of {s['segments']} streamed corpus segment(s); {passkey}{key_rope}; "
        f"KV bytes/token at {max(s['contexts'])} tokens (real nbytes; (!) marks a mismatch "
        f"with attnkit memory); saving = shipped bytes / row bytes"
    )


def markdown(rows: list[StrategyResult], meta: dict, plots: list[str]) -> str:
    """report.md: the table, the settings, the machine, the plots."""
    head = columns(rows)
    lines = ["# attnkit compare", "", caption(meta) + ".", ""]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(head))) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    lines += ["", "## Settings", "", "```json", json.dumps(meta["settings"], indent=2), "```"]
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in meta["machine"].items()]
    lines += [f"- run time: {meta['seconds'] / 60:.1f} min", ""]
    lines += ["## Per strategy", ""]
    for r in rows:
        scored = ", ".join(f"{c}: {n} tokens" for c, n in r.scored_tokens.items())
        lines.append(
            f"- **{r.label}** (`{r.name}`): KV bytes {r.kv_bytes} (predicted "
            f"{r.predicted_kv_bytes}); scored {scored}; passkey {r.passkey.get('overall', 0):.0%}; "
            f"build {r.build_seconds:.1f} s, total {r.seconds:.0f} s"
        )
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


def results_json(rows: list[StrategyResult], meta: dict) -> dict:
    return {**meta, "strategies": [r.as_dict() for r in rows]}
