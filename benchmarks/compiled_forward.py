"""Whether `torch.compile` pays for SmolLM2-135M's cache-free forward on the CPU.

    PYTHONPATH=src python benchmarks/compiled_forward.py [--tokens 128 512] [--repeats N]

Scoring a text (perplexity) runs the model once over its tokens, without a cache: the
forward `torch.compile` captures (a forward with a cache runs eagerly, through
`cache.base.cache_call`). For each length it times, in turn within each repeat, the
eager model (attnkit's C++ kernels: packed matmul, banded causal attention, RMSNorm) and the
compiled one (Inductor, default mode; graph breaks around the C++ kernels), float32, batch 1,
and prints the medians, the compiled model's speed against eager, and the compile time.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings

import torch
from rich.console import Console

from attnkit.models import load_model
from tables import rows_table


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # dynamo warns of every graph break
    torch._logging.set_logs(dynamo=logging.ERROR)

    model, _ = load_model()
    compiled = torch.compile(model)
    rows = []
    with torch.no_grad():
        for n in args.tokens:
            ids = torch.randint(0, model.config.vocab_size, (1, n))
            compile_s = timed(lambda ids=ids: compiled(ids))  # traces and compiles this shape
            eager, fast = [], []
            for _ in range(args.repeats):
                eager.append(timed(lambda ids=ids: model(ids)))
                fast.append(timed(lambda ids=ids: compiled(ids)))
            eager_ms, compiled_ms = (statistics.median(t) * 1e3 for t in (eager, fast))
            rows.append(
                {
                    "tokens": n,
                    "eager ms": eager_ms,
                    "compiled ms": compiled_ms,
                    "compiled speed vs eager": eager_ms / compiled_ms,
                    "first compiled call s": compile_s,
                }
            )
    settings = f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    title = f"SmolLM2-135M forward without a cache, {settings}, medians of {args.repeats}"
    Console(width=200).print(rows_table(title, rows))


if __name__ == "__main__":
    main()
