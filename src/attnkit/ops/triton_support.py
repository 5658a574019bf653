"""What every Triton kernel of attnkit asks of its inputs (this module imports no triton)."""

from __future__ import annotations

import os

import torch

from attnkit.ops.transforms import kernel_refusal

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_unavailable(
    q: torch.Tensor, kernel_imported: bool, inputs: tuple[torch.Tensor, ...] = ()
) -> str | None:
    """Why the Triton kernels cannot run on `q`'s device and dtype, or on `inputs` (the
    call's tensors) while autograd or a transform needs their derivatives; None if they can.

    They run on CUDA tensors, or on CPU tensors in Triton's interpreter when
    `TRITON_INTERPRET=1` was set before triton was imported (how CI runs them). They have no
    backward and no forward-mode derivatives (`attnkit.ops.transforms`).
    """
    if not kernel_imported:
        return "the triton package is not installed"
    if q.dtype not in DTYPES:
        return f"the triton kernels take float32, float16 or bfloat16, got {q.dtype}"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"the triton kernels need CUDA tensors (got {q.device}), or TRITON_INTERPRET=1 set "
            "before triton is imported to run them in Triton's interpreter"
        )
    return kernel_refusal("the triton kernel", *inputs)
