"""What the CPU decode benchmarks share: timing one call, a copy that leaves the last-level
cache cold before it (and the copy bandwidth that copy measures), and the checks their
command lines start with."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from attnkit.ops.cpu_decode import cpu_decode_available, cpu_decode_unavailable_reason

COPY_ELEMENTS = 16 * 1024 * 1024  # 64 MiB of float32: more than any last-level cache here


def timed(fn) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Evictor:
    """A 64 MiB copy: called before a timed call, it leaves the caches cold."""

    def __init__(self) -> None:
        self.src = torch.randn(COPY_ELEMENTS)
        self.dst = torch.empty_like(self.src)

    def __call__(self) -> None:
        self.dst.copy_(self.src)

    def bandwidth(self, repeats: int = 9) -> float:
        """Bytes per second the copy moves (read + write), the median of `repeats`."""
        return statistics.median(2 * self.src.nbytes / timed(self) for _ in range(repeats))


def check_repeats_and_kernel(parser: argparse.ArgumentParser, args) -> None:
    """At least 5 timed runs asked for, and the C++ decode kernel built (or say why not)."""
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5, got {args.repeats}")
    if not cpu_decode_available():
        raise SystemExit(f"the cpp kernel is not available: {cpu_decode_unavailable_reason()}")
