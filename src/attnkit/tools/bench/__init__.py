"""`attnkit bench`: the performance targets, each a ratio to a baseline measured in the same run."""

from attnkit.tools.bench.core import TARGETS, BenchSettings, Machine, Row
from attnkit.tools.bench.run import BenchResult, plan, run_bench

__all__ = ["TARGETS", "BenchResult", "BenchSettings", "Machine", "Row", "plan", "run_bench"]
