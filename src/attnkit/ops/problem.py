"""One attention request, validated once, in the form every backend consumes."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.ops.masks import Geometry, Mask, from_tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionProblem:
    """Validated inputs of `attnkit.attention`.

    Shapes: q `(batch, heads, n_q, head_dim)`, k `(batch, kv_heads, n_k, head_dim)`,
    v `(batch, kv_heads, n_k, v_head_dim)`, with `heads % kv_heads == 0`.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    scale: float
    softcap: float | None
    q_offset: int
    return_lse: bool

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        """Query heads per KV head (1 for MHA, `heads` for MQA)."""
        return self.heads // self.kv_heads

    @property
    def n_q(self) -> int:
        return self.q.shape[2]

    @property
    def n_k(self) -> int:
        return self.k.shape[2]

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.n_q, self.n_k, self.q_offset)

    def empty_result(self) -> tuple[Tensor, Tensor]:
        """Zeros and lse -inf: the answer when no query sees any key.

        Stays attached to autograd when the inputs require grad, so backward gives 0.
        """
        out = self.q.new_zeros(self.batch, self.heads, self.n_q, self.v.shape[-1])
        if any(t.requires_grad for t in (self.q, self.k, self.v)):
            # nan_to_num: NaN in keys nobody sees (padding) must not leak through the 0 *.
            out = out + 0 * sum(torch.nan_to_num(t).sum() for t in (self.q, self.k, self.v))
        lse = torch.full(
            (self.batch, self.heads, self.n_q),
            -math.inf,
            dtype=lse_dtype(self.q.dtype),
            device=out.device,
        )
        return out, lse


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32 (float64 for float64 inputs), whatever the input precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: object, k: object, v: object, check_dtype) -> tuple[Tensor, Tensor, Tensor]:
    """What every attention op asks of q, k, v: 4-D tensors (batch, heads, seq, head_dim)
    whose dtype `check_dtype(name, t)` accepts, sharing one dtype, device and batch."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}"
            )
        check_dtype(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; they must match"
        )
    return q, k, v


def _supported_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {t.dtype}; allowed: {allowed}")


def _positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def make_problem(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | Tensor | None,
    scale: float | None,
    softcap: float | None,
    q_offset: int | None,
    return_lse: bool,
) -> AttentionProblem:
    """Check every argument and name the offending one, its value and what is allowed."""
    q, k, v = check_qkv(q, k, v, _supported_dtype)
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but v has {v.shape[1]}; they must match")
    if q.shape[1] == 0:
        raise ValueError(f"q must have at least one head, got shape {tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"q has {q.shape[1]} heads, which is not a multiple of the {k.shape[1]} KV heads "
            "of k and v (GQA needs heads % kv_heads == 0; MQA has 1 KV head, MHA as many as q)"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} keys but v has {v.shape[2]}; they must match")
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q head_dim {q.shape[3]} differs from k head_dim {k.shape[3]}; they must match "
            "(only v's head_dim may differ)"
        )
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"head_dim must be >= 1, got q {q.shape[3]} and v {v.shape[3]}")

    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else _positive_float("scale", scale)
    softcap = None if softcap is None else _positive_float("softcap", softcap)
    if q_offset is not None:
        if isinstance(q_offset, bool) or not isinstance(q_offset, numbers.Integral):
            raise TypeError(f"q_offset must be an int or None, got {type(q_offset).__name__}")
        q_offset = int(q_offset)
    geo = Geometry.aligned(q.shape[2], k.shape[2], q_offset)

    if mask is not None:
        if isinstance(mask, Tensor):
            mask = from_tensor(mask)
        elif not isinstance(mask, Mask):
            raise TypeError(
                f"mask must be None, an attnkit mask or a boolean tensor, got {type(mask).__name__}"
            )
        mask.check(q.shape[0], geo)
        mask = mask.to(q.device)
    return AttentionProblem(q, k, v, mask, scale, softcap, geo.q_offset, bool(return_lse))
