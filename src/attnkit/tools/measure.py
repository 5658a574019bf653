"""Measuring a call: median wall time and peak CPU memory."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
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
    with _silence_native_stderr():  # the profiler's C++ side logs its start and stop there
        prof.start()
    try:
        # and a warning for every block allocated before it started and freed while it ran:
        # a line each in `attnkit demo`'s table; whatever else fn writes there passes on
        with _native_stderr_without(PROFILER_NOISE):
            fn()
    finally:
        with _silence_native_stderr():
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


PROFILER_NOISE = "Memory block of unknown size was allocated before the profiling started"


@contextlib.contextmanager
def _native_stderr_without(noise: str) -> Iterator[None]:
    """File descriptor 2 (C++ logging, Python's warnings and tracebacks) sent to a temporary
    file for the duration, then its lines passed on to stderr but those holding `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+b") as held:
        try:
            os.dup2(held.fileno(), 2)
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [line for line in held.read().splitlines(True) if noise.encode() not in line]
            if kept:
                sys.stderr.write(b"".join(kept).decode(errors="replace"))
                sys.stderr.flush()


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
