"""PNG figures of a comparison: the memory/quality frontier, streaming, passkey heat-maps."""

from __future__ import annotations

import math
from pathlib import Path

from attnkit.tools.compare.run import StrategyResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower is better), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _label_offsets(pixels: list[tuple[float, float]], width: float, height: float) -> list[float]:
    """Vertical label offsets (points): a marker whose label would overlap an earlier
    marker's label (closer than `width` x `height` pixels) moves its label one line down."""
    offsets: list[float] = []
    for i, (x, y) in enumerate(pixels):
        dy = 4.0
        while any(
            abs(x - px) < width and abs((y + dy) - (py + pdy)) < height
            for (px, py), pdy in zip(pixels[:i], offsets, strict=False)
        ):
            dy -= 10.0
        offsets.append(dy)
    return offsets


def plot_pareto(rows: list[StrategyResult], context: int, path: Path) -> Path:
    """Perplexity at `context` against KV bytes per token; the frontier joined by a line.

    RoPE-scaling rows are left out (they keep the shipped cache and change only positions).
    Points far above the rest (a broken conversion) sit on the top edge with their value,
    so the frontier stays readable.
    """
    plt = _pyplot()
    rows = [r for r in rows if context in r.perplexity and r.family != "context extension"]
    points = [(r.kv_bytes_per_token, r.perplexity[context]) for r in rows]
    front = pareto_front(points)
    best = min(y for _, y in points)
    top = min(max(y for _, y in points) * 1.1, 4 * best)
    fig, ax = plt.subplots(figsize=(9, 6))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(min(x for x, _ in points) / 1.5, max(x for x, _ in points) * 3)
    ax.set_ylim(best / 1.1, top)
    shown = [(x, min(y, top / 1.04)) for x, y in points]
    fig.canvas.draw()
    pixels = [tuple(ax.transData.transform(p)) for p in shown]
    order = sorted(range(len(rows)), key=lambda i: -pixels[i][1])  # top to bottom
    offsets = _label_offsets([pixels[i] for i in order], width=130, height=11)
    for i, dy in zip(order, offsets, strict=True):
        (x, y), clipped = shown[i], points[i][1] > top
        ax.scatter(x, y, s=40, color="C3" if i in front else "C0", zorder=3,
                   marker="^" if clipped else "o")  # fmt: skip
        label = rows[i].label + (f" (ppl {points[i][1]:,.0f}, off the scale)" if clipped else "")
        below = -12 if clipped else dy  # under the top edge, not into the title
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, below), fontsize=8)
    fx, fy = zip(*(points[i] for i in front), strict=True)
    ax.step(fx, fy, where="post", color="C3", alpha=0.6, label="Pareto frontier (red points)")
    ax.set_xlabel("KV-cache bytes per token (real nbytes / tokens)")
    ax.set_ylabel(f"perplexity over the first {context} tokens")
    ax.set_title("Memory against quality: lower left is better")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


STREAMING_FAMILIES = ("as shipped", "window", "window + sinks")


def plot_streaming(rows: list[StrategyResult], path: Path) -> Path:
    """Perplexity against position in a long stream: full attention, windows, sinks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r.family in STREAMING_FAMILIES and r.position_perplexity:
            curve = r.position_perplexity
            style = "-" if r.family != "window" else "--"
            ax.plot(curve["position"], curve["perplexity"], style, label=r.label)
    ax.set_yscale("log")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel("perplexity (per position bin)")
    ax.set_title("Streaming past the window, without and with attention sinks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_passkey(rows: list[StrategyResult], path: Path) -> Path:
    """Exact-match accuracy per (length, depth), one heat-map per strategy."""
    plt = _pyplot()
    rows = [r for r in rows if r.passkey]
    n_cols = min(4, len(rows))
    n_rows = math.ceil(len(rows) / n_cols)
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(3.2 * n_cols, 2.4 * n_rows + 0.6),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for index, (ax, r) in enumerate(zip(axes.flat, rows, strict=False)):
        grid, keys = r.passkey["accuracy"], r.passkey
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(r.label, fontsize=9)
        ax.set_xticks(range(len(keys["depths"])), [f"{d:.0%}" for d in keys["depths"]])
        ax.set_yticks(range(len(keys["lengths"])), [str(n) for n in keys["lengths"]])
        if index % n_cols == 0:
            ax.set_ylabel("length (tokens)", fontsize=8)
        ax.set_xlabel("depth of the key", fontsize=8)
        ax.tick_params(labelsize=7)
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="exact-match accuracy")
    fig.suptitle("Passkey retrieval")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(rows: list[StrategyResult], contexts: list[int], out: Path) -> list[Path]:
    """All three figures into `out`; the frontier at the longest context every row has."""
    common = max((c for c in contexts if all(c in r.perplexity for r in rows)), default=None)
    paths = []
    if common is not None:
        paths.append(plot_pareto(rows, common, out / "pareto.png"))
    paths.append(plot_streaming(rows, out / "streaming.png"))
    paths.append(plot_passkey(rows, out / "passkey.png"))
    return paths
