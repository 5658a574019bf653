"""`attnkit compare`: every KV strategy's memory, speed and quality on a real model."""

from attnkit.tools.compare.run import (
    DEFAULT_STRATEGIES,
    QUICK_STRATEGIES,
    CompareSettings,
    StrategyResult,
    run_compare,
)
from attnkit.tools.compare.strategies import GRAMMAR, Strategy, parse

__all__ = [
    "DEFAULT_STRATEGIES",
    "GRAMMAR",
    "QUICK_STRATEGIES",
    "CompareSettings",
    "Strategy",
    "StrategyResult",
    "parse",
    "run_compare",
]
