"""`latent_decode`: absorbed-MLA decode, one query per sequence over latents and RoPE keys.

Head h of sequence b scores cached token t as `(q_latent[b, h] · latent[b, t] +
q_rope[b, h] · k_rope[b, t]) · scale` over its first `lengths[b]` tokens and returns
`sum_t softmax_t · latent[b, t]`, still in latent space (`LatentAttention` applies W_uv
after). Backends:

- `torch`: three einsums and a softmax, any device and dtype, float64 included; the
  reference the kernel is tested against;
- `triton` (CUDA, or Triton's interpreter with `TRITON_INTERPRET=1` on CPU): one pass
  over the cache that reads each latent once for both products (`ops.triton_latent`);
- `auto`: `triton` for CUDA tensors when Triton is importable, else `torch`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from attnkit.ops.triton_support import triton_unavailable

try:  # optional: CUDA kernels, or the interpreter on CPU
    from attnkit.ops.triton_latent import triton_latent_decode
except ImportError:  # pragma: no cover - triton is a dev dependency
    triton_latent_decode = None

BACKENDS = ("auto", "torch", "triton")


def latent_decode(
    q_latent: Tensor,
    q_rope: Tensor,
    latent: Tensor,
    k_rope: Tensor,
    lengths: Tensor | None = None,
    *,
    scale: float,
    backend: str = "auto",
    return_lse: bool = False,
    check: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Absorbed MLA attention of one query per sequence, in latent space.

    q_latent `(batch, heads, kv_rank)`, q_rope `(batch, heads, rope_dim)`, latent `(batch,
    kv_len, kv_rank)`, k_rope `(batch, kv_len, rope_dim)` (one RoPE key shared by every
    head, as DeepSeek); lengths `(batch,)` integer keys per sequence (default: all kv_len;
    0 gives zeros and lse -inf). Returns `(batch, heads, kv_rank)`, and with `return_lse`
    the log-sum-exp `(batch, heads)` (float32, float64 for float64 inputs). `check=False`
    skips the lengths' range check (a device sync on GPU), for callers whose lengths are
    valid by construction (a cache's own); shapes are always checked.
    """
    lengths = _check(q_latent, q_rope, latent, k_rope, lengths, backend, scale, check)
    inputs = (q_latent, q_rope, latent, k_rope)
    reason = triton_unavailable(q_latent, triton_latent_decode is not None, inputs)
    if backend == "auto":
        backend = "triton" if q_latent.is_cuda and reason is None else "torch"
    if backend == "triton":
        if reason is not None:
            raise ValueError(f"backend='triton' cannot serve this request: {reason}")
        inputs = (
            t if t.stride(-1) == 1 else t.contiguous() for t in (q_latent, q_rope, latent, k_rope)
        )
        out, lse = triton_latent_decode(*inputs, lengths, float(scale))
    else:
        out, lse = _torch(q_latent, q_rope, latent, k_rope, lengths, float(scale))
    return (out, lse) if return_lse else out


def _torch(q_latent, q_rope, latent, k_rope, lengths, scale) -> tuple[Tensor, Tensor]:
    scores = torch.einsum("bhr,bnr->bhn", q_latent, latent)
    scores = (scores + torch.einsum("bhp,bnp->bhn", q_rope, k_rope)) * scale
    unseen = torch.arange(latent.shape[1], device=latent.device) >= lengths.view(-1, 1, 1)
    scores = scores.masked_fill(unseen, -math.inf)
    lse = torch.logsumexp(scores, -1)
    weights = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0).unsqueeze(-1))
    out = torch.einsum("bhn,bnr->bhr", weights, latent.masked_fill(unseen[:, 0, :, None], 0))
    return out, lse.float() if lse.dtype != torch.float64 else lse


def _check(q_latent, q_rope, latent, k_rope, lengths, backend, scale, check) -> Tensor:
    """The validated `lengths` (all of kv_len when None), or an error naming the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    named = (("q_latent", q_latent), ("q_rope", q_rope), ("latent", latent), ("k_rope", k_rope))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dims, got shape {tuple(t.shape)}")
        if t.dtype != q_latent.dtype or t.device != q_latent.device:
            raise ValueError(
                f"{name} must match q_latent's dtype and device ({q_latent.dtype}, "
                f"{q_latent.device}), got {t.dtype} on {t.device}"
            )
    (b, h, rank), (kv_len, rope) = q_latent.shape, (latent.shape[1], k_rope.shape[-1])
    wanted = {"q_rope": (b, h, rope), "latent": (b, kv_len, rank), "k_rope": (b, kv_len, rope)}
    for name, t in named[1:]:
        if tuple(t.shape) != wanted[name]:
            raise ValueError(
                f"{name} must be {wanted[name]} to match q_latent {tuple(q_latent.shape)} "
                f"(batch, heads, kv_rank) and latent's kv_len {kv_len}, got {tuple(t.shape)}"
            )
    if lengths is None:
        return torch.full((b,), kv_len, dtype=torch.int64, device=latent.device)
    integer = isinstance(lengths, Tensor) and not (
        lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool
    )
    if not integer or lengths.shape != (b,):
        shown = (
            f"{lengths.dtype} of shape {tuple(lengths.shape)}"
            if isinstance(lengths, Tensor)
            else type(lengths).__name__
        )
        raise ValueError(f"lengths must be an integer tensor of shape ({b},), got {shown}")
    if check and b:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 0 or high > kv_len:
            raise ValueError(
                f"lengths must lie in [0, kv_len={kv_len}], got values from {low} to {high}"
            )
    return lengths.to(latent.device)
