"""A first look at `attnkit.attention`: every backend on one realistic problem.

The problem has SmolLM2-135M's attention shape (9 query heads over 3 KV heads, head dim
64). For each mask the demo reports each backend's time, its error against a float64
reference, and its peak memory, so the trade-offs are visible on the user's machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import attnkit
from attnkit import masks
from attnkit.tools.measure import median_seconds, peak_bytes


@dataclass(frozen=True)
class DemoRow:
    mask: str
    backend: str
    milliseconds: float
    speed_vs_sdpa: float
    max_abs_error: float
    peak_mib: float

    def as_dict(self) -> dict:
        return asdict(self)


def demo_masks(window: int) -> dict[str, masks.Mask]:
    return {
        "causal": masks.causal(),
        f"window {window}+sinks": masks.sliding_window(window) | masks.sinks(4),
    }


def run_demo(seq_len: int = 2048, window: int = 256, repeats: int = 3, seed: int = 0):
    """Yield one DemoRow per (mask, backend) for a causal prefill of `seq_len` tokens."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 9, seq_len, 64, generator=gen)
    k = torch.randn(1, 3, seq_len, 64, generator=gen)
    v = torch.randn(1, 3, seq_len, 64, generator=gen)
    backends = ["sdpa", "auto", "tiled", "reference"]  # sdpa first: the others' baseline
    for name, mask in demo_masks(window).items():
        exact = attnkit.attention(q.double(), k.double(), v.double(), mask, backend="reference")
        sdpa_ms = 0.0
        for backend in backends:

            def call(backend=backend, mask=mask):
                return attnkit.attention(q, k, v, mask, backend=backend)

            seconds = median_seconds(call, repeats=repeats)
            if backend == "sdpa":
                sdpa_ms = seconds * 1e3
            label = backend
            if backend == "auto":
                problem = attnkit.ops.problem.make_problem(q, k, v, mask, None, None, None, False)
                label = f"auto ({attnkit.choose_backend(problem).name})"
            yield DemoRow(
                mask=name,
                backend=label,
                milliseconds=seconds * 1e3,
                speed_vs_sdpa=sdpa_ms / (seconds * 1e3),
                max_abs_error=(call().double() - exact).abs().max().item(),
                peak_mib=peak_bytes(call) / 2**20,
            )
