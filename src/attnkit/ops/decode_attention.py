"""Decode attention over a contiguous K/V cache: one new query per sequence, ragged lengths.

`decode_attention(q, k, v, lengths)` is the decode step of a contiguous cache
(`ContiguousCache` hands out `(batch, kv_heads, n, d)` views of its larger buffer): each
sequence's query attends to its first `lengths[b]` keys. Backends:

- `cpp`: the fused C++ kernel (`attnkit.ops.cpu_decode`, CPU tensors): K/V read in place
  through their strides, each row streamed once for its whole GQA query group, the
  context split across threads when there are few sequences. float32/float64, and bfloat16/
  float16 widened to float32 on load.
- `torch`: `attnkit.attention` with key padding on torch ops (the `tiled` backend; `reference`
  in float64), any device and dtype.
- `auto`: `cpp` for CPU tensors when the kernel builds and no input requires grad (the
  kernel has no backward), else `torch`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.ops import cpu_decode
from attnkit.ops.attention import attention
from attnkit.ops.masks import padding
from attnkit.ops.paged_decode import check_tensors_and_options, torch_path_backend
from attnkit.ops.problem import lse_dtype

BACKENDS = ("auto", "cpp", "torch")


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    num_splits: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of one query per sequence over its first `lengths[b]` cached keys.

    q: (batch, heads, head_dim) or (batch, heads, 1, head_dim). k/v: (batch, kv_heads, n,
    head_dim / v_head_dim), any strides (no copy when the last dim is contiguous); heads a
    multiple of kv_heads. lengths: (batch,) integers in [0, n], default n (0 gives zeros and
    lse -inf). `num_splits` (cpp): context slices per sequence, default chosen to fill the
    threads. Returns (batch, heads[, 1], v_head_dim) in q's dtype, and with `return_lse` the
    log-sum-exp (batch, heads[, 1]) (float64 for float64 inputs, else float32 from cpp).
    """
    squeeze = _check(q, k, v, lengths, backend, num_splits)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "auto":
        backend = "cpp" if cpu_decode.can_take(q, k, v) else "torch"
    if backend == "cpp":  # answers shaped as q is
        cpu_decode.check_request(q, k, v)
        out, lse = cpu_decode.decode_contiguous(q, k, v, lengths, scale, num_splits)
    else:
        out, lse = _torch_path(q.squeeze(2) if squeeze else q, k, v, lengths, scale)
        if squeeze:
            out, lse = out.unsqueeze(2), lse.unsqueeze(2)
    return (out, lse) if return_lse else out


def _torch_path(q, k, v, lengths, scale) -> tuple[Tensor, Tensor]:
    n = k.shape[2]
    if q.shape[0] == 0:  # no sequences (a padding mask needs one): empty answers
        lse = q.new_empty(0, q.shape[1], dtype=lse_dtype(q.dtype))
        return q.new_empty(0, q.shape[1], v.shape[-1]), lse
    if lengths is not None:
        low, high = (int(x) for x in torch.stack([lengths.min(), lengths.max()]).tolist())
        if low < 0 or high > n:
            raise ValueError(f"lengths must lie in [0, n = {n}], got [{low}, {high}]")
    mask = None if lengths is None else padding(lengths.to(k.device))
    out, lse = attention(
        q.unsqueeze(2),
        k,
        v,
        mask,
        scale=scale,
        return_lse=True,
        backend=torch_path_backend(q),
    )
    return out.squeeze(2), lse.squeeze(2)


def _check(q, k, v, lengths, backend, num_splits) -> bool:
    """Shapes, dtypes and options; returns whether q has the (batch, heads, 1, d) form."""
    named = [("q", q), ("k", k), ("v", v)] + ([] if lengths is None else [("lengths", lengths)])
    check_tensors_and_options(named, backend, BACKENDS, num_splits)
    squeeze = q.dim() == 4 and q.shape[2] == 1
    if q.dim() != 3 and not squeeze:
        raise ValueError(
            "q must be (batch, heads, head_dim) or (batch, heads, 1, head_dim), got shape "
            f"{tuple(q.shape)}"
        )
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be (batch, kv_heads, n, dim), got shape {tuple(t.shape)}"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(
                f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got "
                f"{t.dtype} on {t.device}"
            )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree on (batch, kv_heads, n), got {tuple(k.shape[:3])} and "
            f"{tuple(v.shape[:3])}"
        )
    if k.shape[0] != b:
        raise ValueError(f"k's batch {k.shape[0]} must equal q's batch {b}")
    if k.shape[3] != d:
        raise ValueError(f"k's head_dim {k.shape[3]} must equal q's head_dim {d}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or h % kv_heads:
        raise ValueError(f"q's heads ({h}) must be a multiple of kv_heads ({kv_heads})")
    if lengths is not None and (
        lengths.shape != (b,) or lengths.is_floating_point() or lengths.dtype == torch.bool
    ):
        raise ValueError(
            f"lengths must be integer (batch={b},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    return squeeze
