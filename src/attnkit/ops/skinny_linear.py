"""`linear(x, weight, bias)`: F.linear, with C++ kernels for float32 inputs on CPU.

A decode step multiplies one to a few rows by every weight of the model, so its matmuls
are matrix-vector products bounded by how fast the weights stream from memory. torch's BLAS
call reaches ~10 GB/s there on a 2-core machine whose two cores can read ~35 GB/s, because
it runs such shapes on one thread or packs the weight first. csrc/skinny_linear.cpp splits
the output features across threads and streams each weight row once (see that file).
Up to 32 rows (a continuous-batching decode step) it also beats BLAS once compute-bound:
SmolLM2-135M's matmuls at 16 rows take 48 ms against F.linear's 72 ms, at 32 rows 85 vs
92 ms (2 cores, measured interleaved).

Faster still is csrc/packed_linear.cpp (its kernel is in packed_gemm.h), which reads each
weight from a copy packed once into panels of 32 output features (16 with AVX2; no lane sums, x
broadcast from L1): a pass over SmolLM2's weights at 32 rows 44 vs 68 ms, at 8 rows 18 vs
25, at 1 row 17 vs 20 (2 cores). The packed copy is made on first use and kept on the
weight tensor (`_attnkit_packed`), remade when the weight changes (its data pointer or
version counter); it costs one more copy of every weight the model runs.
`ATTNKIT_PACKED_WEIGHTS=0` keeps memory as it was: the row-major kernel for up to
`MAX_ROWS` rows, F.linear beyond.

The packed kernel also serves prefills, any number of rows, in blocks of rows that stay in
L2 while the panels stream past: at 128-4,128 rows it ran SmolLM2's matmuls at 183-205 GFLOP/s
where F.linear ran at 137-186 (AMD EPYC, 2 cores, FMA peak ~230; measured in turn). Where
BLAS is faster (a Xeon's two FMA units a core) F.linear keeps prefills: past `MAX_ROWS` rows
the first call of each kind times both and the faster serves it from then on.

The kernels serve float32 CPU inputs with a contiguous weight and no autograd (the row-major
kernel 1 to `MAX_ROWS` rows, the packed one any number); everything else (and every
machine where the kernels cannot be built, or `ATTNKIT_NO_CPP=1`) goes to F.linear.
Results equal F.linear's up to float32 rounding.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.ops.cpp_build import load_kernel
from attnkit.ops.transforms import needs_torch_ops

SOURCE = "skinny_linear.cpp"
PACKED_SOURCE = "packed_linear.cpp"
MAX_ROWS = 32


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias`, as F.linear, through the C++ kernel when it applies."""
    return linear_many(x, [weight], [bias])[0]


def linear_many(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> list[Tensor]:
    """`[linear(x, w, b) for w, b in zip(weights, biases)]` in one kernel call when it applies
    to all of them (a layer's q/k/v or gate/up projections share their input)."""
    outs = _kernel_outputs(x, weights, biases) if _input_applies(x) else None
    if outs is None:
        return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]
    lead = x.shape[:-1]
    return [o.view(*lead, w.shape[0]) for o, w in zip(outs, weights, strict=True)]


def _kernel_outputs(x: Tensor, weights, biases) -> list[Tensor] | None:
    """The kernels' outputs `(rows, out_i)`, or None when one of the weights does not fit them
    or no kernel is built. Called about 120 times a decode step: checks stay cheap."""
    in_features, grad = x.shape[-1], torch.is_grad_enabled()
    for w, b in zip(weights, biases, strict=True):
        if not _weight_applies(w, b, in_features, grad):
            return None
    rows = x.reshape(-1, in_features).contiguous()
    packed_module = load_kernel(PACKED_SOURCE) if packed_weights_enabled() else None
    if packed_module is not None:

        def packed_call():
            packed = [packed_weight(w, packed_module) for w in weights]
            outs = [w.shape[0] for w in weights]
            return packed_module.packed_linear_many(rows, packed, outs, biases)

        if rows.shape[0] > MAX_ROWS and not _packed_wins(rows, weights, biases, packed_call):
            return None
        return packed_call()
    module = load_kernel(SOURCE) if rows.shape[0] <= MAX_ROWS else None
    return None if module is None else module.skinny_linear_many(rows, weights, biases)


# Which of the packed kernel and F.linear is faster at prefill sizes, per (row-count bucket,
# weight shapes). Not the same everywhere: on a 2-core Zen 4 (one 512-bit FMA a cycle) the
# kernel ran SmolLM2's prefill matmuls 1.1-1.3x faster than F.linear; on a 2-core Xeon with
# two FMA units a core, BLAS's large-matmul rate (357 GFLOP/s) is above what the kernel
# reached there (~240). So the first call of each kind times both and keeps the faster.
_PREFILL_WINNER: dict[tuple, bool] = {}


def _packed_wins(rows: Tensor, weights, biases, packed_call) -> bool:
    """Whether the packed kernel beat F.linear on this kind of call: measured the first time
    (each run once to warm up, packing included, then the best of two runs each, in turn),
    remembered after."""
    key = (rows.shape[0].bit_length(), rows.shape[1], tuple(w.shape[0] for w in weights))
    if key not in _PREFILL_WINNER:

        def blas_call():
            return [F.linear(rows, w, b) for w, b in zip(weights, biases, strict=True)]

        calls = (packed_call, blas_call)
        for call in calls:
            call()
        seconds = [math.inf, math.inf]
        for _ in range(2):
            for i, call in enumerate(calls):
                start = time.perf_counter()
                call()
                seconds[i] = min(seconds[i], time.perf_counter() - start)
        _PREFILL_WINNER[key] = seconds[0] <= seconds[1]
    return _PREFILL_WINNER[key]


def packed_weights_enabled() -> bool:
    """False when `ATTNKIT_PACKED_WEIGHTS=0`: no packed copies, the row-major kernel."""
    return os.environ.get("ATTNKIT_PACKED_WEIGHTS", "1") != "0"


def packed_weight(weight: Tensor, module) -> Tensor:
    """`weight` packed in panels of 32 (AVX2: 16) output features, made once and kept on the tensor
    until the weight changes (another data pointer, or an in-place write: the version).
    The packed copy holds the data it was made from, so data assigned later (`p.data =`)
    can never reuse that address and pass for it. A write into `weight.data[...]` bumps
    only that detached view's version and goes unseen: write the weight itself under
    `torch.no_grad()`. Inference tensors (made under `torch.inference_mode`) keep no
    version counter: an in-place write to one inside inference mode goes unseen; assign
    new data instead."""
    version = None if weight.is_inference() else weight._version
    key = (weight.data_ptr(), version, tuple(weight.shape))
    cached = getattr(weight, "_attnkit_packed", None)
    if cached is None or cached[0] != key:
        source = weight.detach()
        cached = (key, module.pack(source), source)
        weight._attnkit_packed = cached
    return cached[1]


def _kernel_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernels serve `x @ weight.T + bias`."""
    grad = torch.is_grad_enabled()
    return _input_applies(x) and _weight_applies(weight, bias, x.shape[-1], grad)


def _input_applies(x: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() == 0:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows >= 1 and not needs_torch_ops(x)


def _weight_applies(weight: Tensor, bias: Tensor | None, in_features: int, grad: bool) -> bool:
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] != in_features:
        return False  # F.linear raises its own error for mismatched shapes
    if weight.shape[0] == 0 or in_features == 0 or not weight.is_contiguous():
        return False
    if grad and weight.requires_grad:
        return False
    if bias is None:
        return True
    if bias.dtype != torch.float32 or not bias.is_contiguous():
        return False
    return not (grad and bias.requires_grad)
