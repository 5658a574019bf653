"""Int8 K/V cache: one symmetric absmax scale per (token, KV head), dequantized on read.

Each stored row `x` (one token, one KV head, `head_dim` values) becomes
`q = round(x / s)` in int8 with `s = max|x| / 127`, and reads back as `q · s`. Rounding
moves every element by at most `s / 2 = max|x| / 254`, so the error is bounded relative to
the row's largest value (not to each element). Memory per token and head is
`head_dim` bytes plus one scale instead of `head_dim · 4` (float32) bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.cache.contiguous import ContiguousCache
from attnkit.ops.attention import attention
from attnkit.ops.decode_block import KVStorage
from attnkit.ops.masks import Mask

INT8_MAX = 127


def quantize(x: Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """`(q, scale)`: int8 `q` shaped like `x` and `scale` = absmax/127 over the last dim."""
    work = torch.promote_types(x.dtype, scale_dtype)
    scale = (x.abs().amax(-1) / INT8_MAX).to(scale_dtype)
    # Divide by the stored scale, so the error bound holds for what is read back;
    # an all-zero row stores zeros with scale 0.
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).to(work).unsqueeze(-1)
    q = torch.round(x.to(work) / divisor).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """`q · scale` in `dtype`; `scale` has `q`'s shape without the last dim."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


@dataclass(frozen=True)
class QuantizationError:
    """Error of everything written so far, relative to each row's absmax (at most 1/254)."""

    max_abs: float  # largest |x - dequantized x| of any element
    max_rel: float  # largest |x - dequantized x| / max|row|
    mean_rel: float  # mean of |x - dequantized x| / max|row| over all elements (K and V)


class QuantizedCache(ContiguousCache):
    """A `ContiguousCache` whose K/V buffers are int8, with scale buffers beside them.

    Views come back in `dtype` (the model's). Scales are `(layers, max_seqs, kv_heads,
    capacity)` in `scale_dtype` (float32 by default: a half-precision scale would add an
    error comparable to the quantization's own). `nbytes` is the int8 data plus the scales.
    `quantization_error` reports what storing in int8 has cost so far.
    """

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> None:
        """Arguments as `ContiguousCache`; `dtype` is the views' and `scale_dtype` the scales'."""
        for name, value in (("dtype", dtype), ("scale_dtype", scale_dtype)):
            if not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise ValueError(f"{name} must be a floating-point torch dtype, got {value!r}")
        super().__init__(n_layers, kv_heads, head_dim, dtype=torch.int8, **kwargs)
        self.dtype, self.scale_dtype = dtype, scale_dtype
        shape = self.k.shape[:4]
        self.k_scale = torch.zeros(shape, dtype=scale_dtype, device=self.k.device)
        self.v_scale = torch.zeros(shape, dtype=scale_dtype, device=self.k.device)
        # Running error statistics, kept on the device (no sync per layer):
        # [max_abs, max_rel, sum_rel] and the number of elements behind sum_rel.
        self._error = torch.zeros(3, dtype=torch.float64, device=self.k.device)
        self._error_count = 0

    @property
    def nbytes(self) -> int:
        scales = self.k_scale.untyped_storage().nbytes() + self.v_scale.untyped_storage().nbytes()
        return super().nbytes + scales

    @property
    def quantization_error(self) -> QuantizationError:
        """Error introduced by int8 storage over every `update` so far."""
        max_abs, max_rel, sum_rel = self._error.tolist()
        return QuantizationError(max_abs, max_rel, sum_rel / max(self._error_count, 1))

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self._dequantized(*self._store(layer, k, v))

    def _dequantized(self, k_int: Tensor, v_int: Tensor, scales) -> tuple[Tensor, Tensor]:
        k_scale, v_scale = scales
        return dequantize(k_int, k_scale, self.dtype), dequantize(v_int, v_scale, self.dtype)

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, pattern: Mask | None, backend="auto"
    ) -> Tensor:
        """At decode the C++ kernel reads the int8 rows and their scales as stored (a
        quarter of float32's bytes); other steps dequantize and go through `attention`."""
        k_int, v_int, scales = self._store(layer, k, v)
        out = self._decoded(layer, q, k_int, v_int, pattern, backend, scales)
        if out is not None:
            return out
        k_all, v_all = self._dequantized(k_int, v_int, scales)
        return attention(q, k_all, v_all, self.layer_mask(layer, pattern), backend=backend)

    def decode_storage(self) -> KVStorage | None:
        """The int8 buffers with their scales and error statistics, for float32 K/V (the
        kernel quantizes each new row as `quantize` does and counts its error)."""
        if type(self) is not QuantizedCache or self.dtype != torch.float32:
            return None
        if self.scale_dtype != torch.float32:
            return None
        scales = self.k_scale.transpose(2, 3), self.v_scale.transpose(2, 3)
        return self._slot_storage(scales=scales, error=self._error)

    def stored_every_layer(self) -> None:
        per_layer = self.step.batch * self.kv_heads * (self.head_dim + self.v_head_dim)
        self._error_count += self.n_layers * per_layer  # elements behind the error's sum

    def _store(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, tuple]:
        """Quantize and write this step's K/V; the step's int8 views `(batch, kv_heads,
        kv_len, d)` and their scales `(batch, kv_heads, kv_len)`."""
        (qk, sk), (qv, sv) = quantize(k, self.scale_dtype), quantize(v, self.scale_dtype)
        k_int, v_int = super().update(layer, qk, qv)  # checks, then writes the int8 rows
        step, place = self.step, self._placement(self.step)
        self.k_scale[layer][place.slot_index, :, place.positions] = sk.transpose(1, 2)
        self.v_scale[layer][place.slot_index, :, place.positions] = sv.transpose(1, 2)
        for x, q, s in ((k, qk, sk), (v, qv, sv)):
            self._track_error(x, q, s)
        read = (layer, place.rows, slice(None), slice(None, step.kv_len))
        return k_int, v_int, (self.k_scale[read], self.v_scale[read])

    def _track_error(self, x: Tensor, q: Tensor, scale: Tensor) -> None:
        work = torch.promote_types(self.dtype, torch.float32)
        err = (x.to(work) - dequantize(q, scale, self.dtype).to(work)).abs()
        absmax = x.to(work).abs().amax(-1, keepdim=True)
        rel = torch.where(absmax > 0, err / absmax, torch.zeros_like(err))
        stats = torch.stack([err.max(), rel.max(), rel.sum()]).to(self._error)
        self._error = torch.cat(
            [torch.maximum(self._error[:2], stats[:2]), self._error[2:] + stats[2:]]
        )
        self._error_count += err.numel()

    def fork(self, seq: int) -> int:
        child = super().fork(seq)
        src, dst, n = self._slot[seq], self._slot[child], self.length(seq)
        for scale in (self.k_scale, self.v_scale):
            scale[:, dst, :, :n] = scale[:, src, :, :n]
        return child

    def _grow(self, needed: int) -> None:
        super()._grow(needed)  # raises CacheFull at max_len; else grows the int8 buffers
        for name in ("k_scale", "v_scale"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], self.capacity)
            new[..., : old.shape[3]] = old
            setattr(self, name, new)
