"""What a benchmark row is, how it is timed, and the machine limits rows are measured against.

Every row compares attnkit with one named baseline measured in the same run and reports
`speed = baseline seconds / attnkit seconds` (above 1: attnkit is faster). A target is a
minimum speed: "at least 1.5x faster than X" is 1.5, "within 1.3x of the floor" is 1/1.3.
"""

from __future__ import annotations

import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attnkit.ops.cpp_build import (
    compile_flags,
    cpp_kernels_enabled,
    load_kernel,
    unavailable_reason,
)

TARGETS = {
    1: "GQA/MQA prefill",
    2: "sliding window",
    3: "decode vs memory floor",
    4: "MLA decode",
    5: "linear attention",
    6: "end to end (SmolLM2-135M)",
}


@dataclass(frozen=True)
class BenchSettings:
    """Sizes and repeats; `quick()` shrinks every problem to run in a few minutes."""

    quick: bool = False
    repeats: int = 5
    targets: tuple[int, ...] = tuple(TARGETS)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"targets must be a non-empty subset of {list(TARGETS)}, got {unknown}"
            )
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats!r}")

    def pick(self, full, quick):
        """`quick` in a quick run, else `full`."""
        return quick if self.quick else full


@dataclass
class Row:
    """attnkit against one baseline on one problem; `speed` = baseline s / attnkit s."""

    target: int
    case: str
    attnkit_s: float
    baseline: str
    baseline_s: float
    goal: float | None  # the minimum speed the target asks for; None: shown for context
    note: str = ""
    speed: float = field(init=False)
    met: bool | None = field(init=False)

    def __post_init__(self) -> None:
        self.speed = self.baseline_s / self.attnkit_s if self.attnkit_s > 0 else math.inf
        measured = not math.isnan(self.speed)
        self.met = self.speed >= self.goal if self.goal is not None and measured else None

    @property
    def goal_text(self) -> str:
        if self.goal is None:
            return "—"
        if self.goal >= 1:
            return f">= {self.goal:g}x faster"
        return f"<= {1 / self.goal:.2g}x its time"

    def as_dict(self) -> dict:
        return asdict(self) | {"goal_text": self.goal_text}


@dataclass(frozen=True)
class Case:
    """One measurement of a target: `run(timer)` returns its rows."""

    target: int
    name: str
    run: Callable[[Timer], list[Row]]


class Timer:
    """Median wall time of a call over the run's repeats, after one warm-up call.

    A call too quick to time well once (a sub-millisecond decode step, where one timer
    interrupt or page fault is a large share) gets more repeats: enough to fill
    `QUICK_CALLS_SECONDS` by the fastest call so far, at most `MAX_REPEATS`.
    """

    QUICK_CALLS_SECONDS = 0.1
    MAX_REPEATS = 50

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats

    def __call__(self, fn: Callable[[], object], repeats: int | None = None) -> float:
        return self._medians((fn,), repeats)[0]

    def pair(
        self, ours: Callable[[], object], theirs: Callable[[], object], repeats: int | None = None
    ) -> tuple[float, float]:
        """Median seconds of two calls timed in turn (ours, theirs, ours, ...), after one
        warm-up call each: a drift in the machine's speed (a shared host) falls on both."""
        return self._medians((ours, theirs), repeats)

    def in_turn(
        self, *fns: Callable[[], object], before: Callable[[], object] | None = None
    ) -> tuple[float, ...]:
        """`pair` for any number of calls: each one's median seconds, timed in turn.
        `before`, if given, runs ahead of every call, untimed (a `CacheEvictor`, say)."""
        return self._medians(fns, None, before)

    def _medians(
        self, fns, repeats: int | None, before: Callable[[], object] | None = None
    ) -> tuple[float, ...]:
        """Each of `fns` called in turn, one warm-up round then the timed rounds; the
        rounds are counted from the fastest round so far, so a slow first call (a kernel
        built, weights packed) does not leave a quick one with the base repeats."""
        times: list[list[float]] = [[] for _ in fns]
        with torch.inference_mode():
            fastest = sum(_seconds(fn, before) for fn in fns)
            while len(times[0]) < self._repeats(repeats, fastest):
                for fn, out in zip(fns, times, strict=True):
                    out.append(_seconds(fn, before))
                fastest = min(fastest, sum(out[-1] for out in times))
        return tuple(statistics.median(out) for out in times)

    def _repeats(self, asked: int | None, round_seconds: float) -> int:
        repeats = asked or self.repeats
        wanted = math.ceil(self.QUICK_CALLS_SECONDS / max(round_seconds, 1e-6))
        return max(repeats, min(self.MAX_REPEATS, wanted))


def _seconds(fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    if before is not None:
        before()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class CacheEvictor:
    """A call that leaves the CPU caches holding none of what ran before it: a read of a
    buffer four times the last-level cache (at least 128 MiB; where the cores' share of it
    is split over several L3s, each still sees more than its size). A read leaves only clean
    lines behind, so the call timed after it pays no write-backs of the evictor's data. Run
    before a timed call (`Timer.in_turn(..., before=CacheEvictor())`), it makes that call read
    its data from memory."""

    def __init__(self) -> None:
        self.buffer = torch.ones(max(128 * 2**20, 4 * last_level_cache_bytes()) // 4)

    def __call__(self) -> float:
        return float(self.buffer.sum())


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache Linux reports for CPU 0 (sysfs), or 0 where it says nothing."""
    sizes = []
    for path in caches.glob("index*/size"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes, default=0)


@dataclass(frozen=True)
class Machine:
    """The limits rows are compared with, measured at the start of the run."""

    copy_bytes_per_s: float  # read + write bytes of a tensor copy past the last-level cache
    matmul_flops_per_s: float  # float32 1024^3 matmul
    # float32 FMAs on registers, every thread at once (`peak_rate`); None: unmeasured
    peak_flops_per_s: float | None
    description: str

    PEAK_SECONDS = 1.0  # calls of the FMA chains for at least this long; the best one counts

    @staticmethod
    def copy_rate(timer: Timer) -> float:
        """Read + write bytes per second of a tensor copy that does not fit the caches:
        source and destination each as large as the last-level cache, at least 64 MiB (a
        64 MiB copy ran from the 480 MiB L3 of a 2-core Xeon VM at 1.2-1.9x the DRAM rate,
        which flattered every floor measured against it)."""
        src = torch.randn(max(64 * 2**20, last_level_cache_bytes()) // 4)
        dst = torch.empty_like(src)
        return 2 * src.nbytes / timer(lambda: dst.copy_(src))

    @classmethod
    def peak_rate(cls) -> float | None:
        """The float32 FLOPs per second of `csrc/fma_peak.cpp`'s FMA chains, the best of
        14-30 ms calls over `PEAK_SECONDS` (a peak: the most the cores did; on a 2-vCPU VM the
        first quarter second ran at one core's rate); None without the C++ kernels."""
        module = load_kernel("fma_peak.cpp")
        if module is None:
            return None
        best, spent = 0.0, 0.0
        while spent < cls.PEAK_SECONDS:
            start = time.perf_counter()
            flops = module.fma_flops(2**22)
            seconds = time.perf_counter() - start
            best, spent = max(best, flops / seconds), spent + seconds
        return best

    @classmethod
    def measure(cls, timer: Timer) -> Machine:
        copy = cls.copy_rate(timer)
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        flops = 2 * 1024**3 / timer(lambda: a @ b)
        peak = cls.peak_rate()
        cpu = platform.processor() or platform.machine()
        kernels = " ".join(compile_flags()) if cpp_kernels_enabled() else "off (ATTNKIT_NO_CPP)"
        text = (
            f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__} "
            f"({torch.backends.cpu.get_cpu_capability()}), attnkit's kernels {kernels}; "
            f"copy {copy / 1e9:.1f} GB/s, matmul {flops / 1e9:.0f} GFLOP/s, "
        )
        if peak is None:  # then the compute floors fall back to the matmul rate
            reason = (unavailable_reason("fma_peak.cpp") or "").splitlines()[0][:120]
            text += f"FMA peak unmeasured ({reason}) (float32)"
        else:
            text += f"FMA peak {peak / 1e9:.0f} GFLOP/s (float32)"
        return cls(copy, flops, peak, text)

    @property
    def floor_flops_per_s(self) -> float:
        """What `peak_floor` divides by: the FMA peak, or the matmul rate where the peak
        kernel could not be built (ATTNKIT_NO_CPP, no compiler)."""
        return self.matmul_flops_per_s if self.peak_flops_per_s is None else self.peak_flops_per_s

    @property
    def peak_name(self) -> str:
        """The name of `floor_flops_per_s`, for the rows that divide by it."""
        return "matmul rate (FMA peak unmeasured)" if self.peak_flops_per_s is None else "FMA peak"

    def peak_floor(self, flops: float) -> float:
        """Seconds for `flops` at the FMA peak: no kernel on this machine can take less."""
        return flops / self.floor_flops_per_s


def causal_flops(n: int, heads: int, d: int) -> float:
    """Multiply-adds x 2 of causal attention's two matmuls over the kept (i >= j) pairs."""
    return 2 * 2 * heads * d * n * (n + 1) / 2
