"""Measuring a call: median wall time and peak CPU memory."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

from torch.profiler import ProfilerActivity, profile


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU memory allocated by torch (net of frees) while `fn()` runs.

    Read from the profiler's allocation events, so it counts only what `fn` allocates,
    not tensors that already existed.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    # The profiler's C++ side logs its start and stop to stderr, and a warning for every
    # block allocated before it started and freed while it ran ("Memory block of unknown
    # size..."): each a line in `attnkit demo`'s output. Python's own errors still show.
    with _silence_native_stderr():
        prof.start()
        try:
            fn()
        finally:
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _silence_native_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the duration (C++ logging goes there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
