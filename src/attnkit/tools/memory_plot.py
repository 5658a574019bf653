"""PNG line plot of KV-cache memory against context length, per model and variant."""

from __future__ import annotations

from pathlib import Path

from attnkit.tools.memory import KVSpec, kv_bytes
from attnkit.tools.variants import chosen_variants

PLOT_MIN_CONTEXT = 1024
PLOT_MAX_CONTEXT = 128 * 1024


def plot_contexts(max_context: int = PLOT_MAX_CONTEXT, points: int = 48) -> list[int]:
    """Context lengths spaced evenly on a log scale from 1k to `max_context` (>= 1k)."""
    top = max(max_context, PLOT_MIN_CONTEXT)
    ratio = (top / PLOT_MIN_CONTEXT) ** (1 / (points - 1))
    values = {round(PLOT_MIN_CONTEXT * ratio**i) for i in range(points)}
    return sorted(values | {top})


def plot_memory(
    specs: list[KVSpec],
    path: str | Path,
    *,
    dtype: str = "bf16",
    variants: list[str] | None = None,
    max_context: int = PLOT_MAX_CONTEXT,
) -> Path:
    """KV GiB of one request vs context (log x) for each model as shipped and its variants.

    `variants=None` plots the default what-if rows. Windowed variants flatten at W.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot file must end in .png, got {str(path)!r}")
    contexts = plot_contexts(max_context)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    try:
        for spec in specs:
            prefix = f"{spec.name}: " if len(specs) > 1 else ""
            for label, variant, kv_dtype in chosen_variants(spec, dtype, variants):
                gib = [kv_bytes(variant, n, 1, kv_dtype) / 2**30 for n in contexts]
                style = "-" if label == "as shipped" else "--"
                ax.plot(contexts, gib, style, label=f"{prefix}{label} ({kv_dtype})")
        ax.set_xscale("log", base=2)
        ticks = [t for t in (2**i for i in range(10, 31)) if t <= contexts[-1]]
        ax.set_xticks(ticks, [f"{t // 1024:,}k" for t in ticks])
        ax.set_xlabel("context length (tokens per request)")
        ax.set_ylabel("KV cache per request (GiB)")
        names = ", ".join(s.name for s in specs)
        ax.set_title(f"KV-cache memory vs context: {names}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
