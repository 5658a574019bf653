"""`Linear`: nn.Linear whose forward takes attnkit's packed-weight matmul kernel on CPU.

Every projection in attnkit's layers is this class. It is an `nn.Linear` (same parameters,
state-dict keys, isinstance checks); only the forward differs, through
`attnkit.ops.skinny_linear.linear`, which equals F.linear and is faster on float32 CPU
inputs: the few rows of a decode step (memory-bound) and a prefill's many (compute-bound).
"""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.ops.skinny_linear import linear, linear_many


class Linear(nn.Linear):
    """nn.Linear with the packed-matmul fast path on CPU (inference only)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def project(x: Tensor, layers: tuple[nn.Linear, ...]) -> list[Tensor]:
    """`[layer(x) for layer in layers]`, in one kernel call (they share their input)."""
    return linear_many(x, [m.weight for m in layers], [m.bias for m in layers])
