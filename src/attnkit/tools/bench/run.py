"""The suite: which cases each target runs, in order, and the result of a run."""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnkit.tools.bench import endtoend, kernels
from attnkit.tools.bench.core import BenchSettings, Case, Machine, Row, Timer

CASE_BUILDERS = {
    1: [kernels.prefill_cases],
    2: [kernels.window_cases],
    3: [kernels.decode_cases],
    4: [kernels.mla_cases],
    5: [kernels.linear_cases],
    6: [
        endtoend.decode_cases,
        endtoend.batching_cases,
        endtoend.prefill_cases,
        endtoend.llama_cpp_cases,
    ],
}


@dataclass
class BenchResult:
    settings: BenchSettings
    machine: Machine
    rows: list[Row]
    date: str

    def as_dict(self) -> dict:
        return {
            "date": self.date,
            "machine": self.machine.description,
            "platform": platform.platform(),
            "copy_GBps": self.machine.copy_bytes_per_s / 1e9,
            "matmul_GFLOPps": self.machine.matmul_flops_per_s / 1e9,
            "fma_peak_GFLOPps": self.machine.floor_flops_per_s / 1e9,
            "compute_floor": self.machine.peak_name,
            "quick": self.settings.quick,
            "repeats": self.settings.repeats,
            "rows": [row.as_dict() for row in self.rows],
        }


def plan(settings: BenchSettings, machine: Machine) -> list[Case]:
    """Every case the settings' targets run, in target order."""
    return [
        case
        for target in sorted(settings.targets)
        for build in CASE_BUILDERS[target]
        for case in build(settings, machine)
    ]


def run_bench(
    settings: BenchSettings,
    on_case: Callable[[Case, int, int], None] | None = None,
) -> BenchResult:
    """Measure the machine, then run each case; `on_case(case, index, total)` before each."""
    timer = Timer(settings.repeats)
    machine = Machine.measure(timer)
    cases = plan(settings, machine)
    rows: list[Row] = []
    for index, case in enumerate(cases):
        if on_case is not None:
            on_case(case, index, len(cases))
        with torch.inference_mode():
            rows.extend(case.run(timer))
    date = datetime.date.today().isoformat()
    return BenchResult(settings, machine, rows, date)
