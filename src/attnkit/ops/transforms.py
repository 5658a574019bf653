"""When inputs must go through torch's ops: autograd, forward-mode AD and `torch.func`.

attnkit's C++ and Triton kernels have no derivatives and read raw storage, and torch's fused
SDPA kernels have no forward-mode AD: each caller asks here and takes a path of plain torch
ops (or declines, naming the reason) when these say so.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

TRANSFORM_RUNNING = "forward-mode AD or a torch.func transform (vmap, grad, jvp) is running"


def needs_torch_ops(*tensors: torch.Tensor) -> bool:
    """Whether these inputs must go through torch's ops rather than a C++ kernel, which has
    no derivatives and reads raw storage (`kernel_refusal` says why)."""
    return _records_grad(tensors) or transform_active()


def kernel_refusal(kernel: str, *tensors: torch.Tensor) -> str | None:
    """Why `kernel` (its name in a sentence: "the banded kernel") cannot serve these inputs
    (see `needs_torch_ops`), and what to do; None when it can."""
    if _records_grad(tensors):
        return (
            f"{kernel} has no backward, but an input requires grad: backend='auto' takes "
            "torch's ops then (or call it under torch.no_grad() if no gradient is needed)"
        )
    if transform_active():
        return (
            f"{kernel} reads raw storage and has no derivatives, but {TRANSFORM_RUNNING}: "
            "backend='auto' takes torch's ops then"
        )
    return None


def _records_grad(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether autograd records a backward through any of these inputs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def transform_active() -> bool:
    """Whether forward-mode AD or a `torch.func` transform is running: a
    `forward_ad.dual_level` is open (`torch.func.jvp` opens one too), so inputs may carry
    tangents a kernel would drop, or a functorch level is (`vmap`, `grad`, `jvp`), whose
    wrapped tensors have no storage for a kernel to read. Two global reads, ~0.1 us."""
    return forward_ad._current_level >= 0 or torch._C._functorch.maybe_current_level() is not None
