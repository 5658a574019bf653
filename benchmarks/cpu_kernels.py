"""attnkit's C++ CPU kernels against torch on the same host, timed in turn.

    PYTHONPATH=src python benchmarks/cpu_kernels.py [--repeats N] [--json]

- decode matmuls: one pass over SmolLM2-135M-shaped weights (30 layers' q/k/v/o/gate/up/down
  and the 49152-token head) at 1, 8 and 32 rows, `attnkit.ops.skinny_linear.linear_many`
  (the packed kernel) against `F.linear` on each weight;
- banded causal attention (`attention(..., backend="banded")`) against torch SDPA's causal
  kernel (`is_causal`, `enable_gqa`), for prefill and for a few rows against an 8k cache
  (where SDPA needs the dense mask attnkit's `sdpa` backend builds).

Each row's ratio is the median of runs where attnkit and torch alternate. To time the code
an AVX2 host runs on an AVX-512 machine, build the kernels for AVX2 and hold torch to it:

    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
        ATTNKIT_CPU_ARCH=x86-64-v3 PYTHONPATH=src python benchmarks/cpu_kernels.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import attnkit
from attnkit import masks
from attnkit.ops import cpp_build
from attnkit.ops.skinny_linear import linear_many

# SmolLM2-135M: hidden 576, 9/3 heads of 64, MLP 1536, 30 layers, vocabulary 49152.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576)]
DOWN, LAYERS, VOCAB = (576, 1536), 30, 49152


def in_turn(ours, theirs, repeats: int) -> tuple[float, float, float]:
    """Median seconds of each and the median of the per-run ratios (theirs / ours); the
    two take turns going first, so neither always finds the other's data in cache."""
    ours()  # warm-up (and the kernels' first build)
    theirs()
    a, b = [], []
    for i in range(repeats):
        pairs = [(ours, a), (theirs, b)]
        for fn, out in pairs if i % 2 == 0 else pairs[::-1]:
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    ratio = statistics.median(t / o for o, t in zip(a, b, strict=True))
    return statistics.median(a), statistics.median(b), ratio


def row(case: str, baseline: str, times: tuple[float, float, float], err: float) -> dict:
    ours, theirs, ratio = times
    return {
        "case": case, "attnkit ms": 1e3 * ours, "baseline": baseline,
        "baseline ms": 1e3 * theirs, "speed": ratio, "max err": err,
    }  # fmt: skip


def attnkit_pass(layers, head, x, x_mlp) -> None:
    for w in layers:  # a layer's q/k/v and gate/up projections share their input: one call
        linear_many(x, w[:3], [None] * 3)
        linear_many(x, w[3:4], [None])
        linear_many(x, w[4:6], [None] * 2)
        linear_many(x_mlp, w[6:], [None])
    linear_many(x, [head], [None])


def torch_pass(layers, head, x, x_mlp) -> None:
    for w in layers:
        for weight in w[:6]:
            F.linear(x, weight)
        F.linear(x_mlp, w[6])
    F.linear(x, head)


def matmul_rows(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    layers = [
        [torch.randn(*shape, generator=g) * 0.02 for shape in [*LAYER_SHAPES, DOWN]]
        for _ in range(LAYERS)
    ]
    head = torch.randn(VOCAB, 576, generator=g) * 0.02
    rows = []
    for n in (1, 8, 32):
        inputs = (layers, head, torch.randn(n, 576, generator=g), torch.randn(n, 1536, generator=g))
        times = in_turn(partial(attnkit_pass, *inputs), partial(torch_pass, *inputs), repeats)
        x = inputs[2]
        got = linear_many(x, [head], [None])[0].double()
        err = (got - x.double() @ head.double().T).abs().max().item()
        rows.append(row(f"SmolLM2-135M weights pass, {n} rows", "F.linear", times, err))
    return rows


def banded_rows(repeats: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    rows = []
    prefill = [(8, 2, 1024, 128), (9, 3, 2048, 64), (8, 2, 4096, 64), (8, 8, 4096, 64)]
    for heads, kv, n, d in prefill:
        q, k, v = (torch.randn(1, h, n, d, generator=g) for h in (heads, kv, kv))
        times = in_turn(
            lambda q=q, k=k, v=v: attnkit.attention(q, k, v, masks.causal(), backend="banded"),
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            ),
            repeats,
        )
        err = _banded_err(q, k, v)
        case = f"causal prefill {heads}/{kv} heads, N {n}, d {d}"
        rows.append(row(case, "torch SDPA is_causal", times, err))
    for heads, kv, n_q in [(8, 8, 8), (8, 8, 16), (8, 8, 32), (8, 2, 2), (8, 2, 8)]:
        q = torch.randn(1, heads, n_q, 64, generator=g)
        k, v = (torch.randn(1, kv, 8192, 64, generator=g) for _ in range(2))
        times = in_turn(
            lambda q=q, k=k, v=v: attnkit.attention(q, k, v, masks.causal(), backend="banded"),
            lambda q=q, k=k, v=v: attnkit.attention(q, k, v, masks.causal(), backend="sdpa"),
            repeats,
        )
        err = _banded_err(q, k, v)
        case = f"{n_q} rows x {heads}/{kv} heads after 8192 keys"
        rows.append(row(case, "torch SDPA + its dense causal mask", times, err))
    return rows


def _banded_err(q, k, v) -> float:
    """The banded kernel's largest error against the float64 reference."""
    got = attnkit.attention(q, k, v, masks.causal(), backend="banded").double()
    want = attnkit.attention(*(t.double() for t in (q, k, v)), masks.causal(), backend="reference")
    return (got - want).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per call (>= 5)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5, got {args.repeats}")
    for source in ("packed_linear.cpp", "banded_attention.cpp"):
        if cpp_build.load_kernel(source) is None:
            raise SystemExit(f"{source} is unavailable: {cpp_build.unavailable_reason(source)}")
    setup = (
        f"{torch.get_num_threads()} threads, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), kernels "
        f"{' '.join(cpp_build.compile_flags())}, medians of {args.repeats}"
    )
    with torch.inference_mode():
        rows = matmul_rows(args.repeats) + banded_rows(args.repeats)
    if args.json:
        print(json.dumps({"setup": setup, "rows": rows}, indent=1))
        return
    table = Table(title=f"attnkit's CPU kernels vs torch ({setup}); speed = baseline / attnkit")
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("case", "baseline") else "right")
    for r in rows:
        table.add_row(
            r["case"], f"{r['attnkit ms']:.2f}", r["baseline"], f"{r['baseline ms']:.2f}",
            f"{r['speed']:.2f}x", f"{r['max err']:.1e}",
        )  # fmt: skip
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
