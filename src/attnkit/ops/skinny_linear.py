"""`linear(x, weight, bias)`: F.linear, with a C++ kernel for decode-sized inputs on CPU.

A decode step multiplies one to a few rows by every weight of the model, so its matmuls
are matrix-vector products bounded by how fast the weights stream from memory. torch's BLAS
call reaches ~10 GB/s there on a 2-core machine whose two cores can read ~35 GB/s, because
it runs such shapes on one thread or packs the weight first. csrc/skinny_linear.cpp splits
the output features across threads and streams each weight row once (see that file).
Up to 32 rows (a continuous-batching decode step) it also beats BLAS once compute-bound:
SmolLM2-135M's matmuls at 16 rows take 48 ms against F.linear's 72 ms, at 32 rows 85 vs
92 ms (2 cores, measured interleaved).

The kernel serves float32 CPU inputs of 1 to `MAX_ROWS` rows with a contiguous weight and
no autograd; everything else (and every machine where the kernel cannot be built, or
`ATTNKIT_NO_CPP=1`) goes to F.linear. Results equal F.linear's up to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.ops.cpp_build import load_kernel, wants_grad

SOURCE = "skinny_linear.cpp"
MAX_ROWS = 32


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ weight.T + bias`, as F.linear, through the C++ kernel when it applies."""
    return linear_many(x, [weight], [bias])[0]


def linear_many(x: Tensor, weights: list[Tensor], biases: list[Tensor | None]) -> list[Tensor]:
    """`[linear(x, w, b) for w, b in zip(weights, biases)]` in one kernel call when it applies
    to all of them (a layer's q/k/v or gate/up projections share their input)."""
    if all(_kernel_applies(x, w, b) for w, b in zip(weights, biases, strict=True)):
        module = load_kernel(SOURCE)
        if module is not None:
            rows = x.reshape(-1, x.shape[-1]).contiguous()
            outs = module.skinny_linear_many(rows, weights, biases)
            return [o.view(*x.shape[:-1], w.shape[0]) for o, w in zip(outs, weights, strict=True)]
    return [F.linear(x, w, b) for w, b in zip(weights, biases, strict=True)]


def _kernel_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() == 0 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return False  # F.linear raises its own error for mismatched shapes
    rows = x.numel() // max(x.shape[-1], 1)
    if not 1 <= rows <= MAX_ROWS or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return not wants_grad(*tensors)
