"""KV-cache and weights memory as pure functions of a model's attention config.

Nothing here allocates: every number is computed from a `KVSpec`. The predictors of
attnkit's own caches live in `cache_memory`, the what-if variants in `variants`, the whole
`attnkit memory` report in `memory_report`. Sizes are counted in bits internally so that
int4 (half a byte per value) stays exact; byte totals round up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "int4": 4}
_TORCH_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "int8",
}


def dtype_bits(dtype: str | torch.dtype) -> int:
    """Bits per stored value: a name from `DTYPE_BITS` or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size() * 8
    if dtype not in DTYPE_BITS:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BITS)}, got {dtype!r}")
    return DTYPE_BITS[dtype]


def _bytes(bits: int) -> int:
    return -(-bits // 8)


def _check_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class KVSpec:
    """What a decoder's KV cache stores per token: layers, KV heads and dims, window, MLA.

    `window` caps the cached tokens of the layers in `window_layers` (all layers when None)
    at W. With MLA (`kv_rank` set) each layer caches one latent vector of `kv_rank` values
    plus a decoupled RoPE key of `rope_dim` values, whatever the head counts; `kv_heads` and
    `head_dim`/`v_head_dim` then describe the per-head K/V that MLA expands to (used by the
    what-if variants). `params` is the parameter count (None: unknown).
    """

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int | None = None
    window: int | None = None
    window_layers: tuple[int, ...] | None = None
    kv_rank: int | None = None
    rope_dim: int | None = None
    params: int | None = None

    def __post_init__(self) -> None:
        for field in ("layers", "heads", "kv_heads", "head_dim"):
            _check_int(field, getattr(self, field))
        for field in ("v_head_dim", "window", "kv_rank", "params"):
            if getattr(self, field) is not None:
                _check_int(field, getattr(self, field))
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads={self.heads} must be a multiple of kv_heads={self.kv_heads} (GQA groups)"
            )
        if self.window_layers is not None:
            if self.window is None:
                raise ValueError("window_layers is set but window is None")
            bad = [i for i in self.window_layers if not 0 <= i < self.layers]
            if bad or len(set(self.window_layers)) != len(self.window_layers):
                raise ValueError(
                    f"window_layers must be distinct layer indices in [0, {self.layers}), "
                    f"got {self.window_layers!r}"
                )
        if (self.kv_rank is None) != (self.rope_dim is None):
            raise ValueError(
                f"MLA needs both kv_rank and rope_dim, got kv_rank={self.kv_rank!r}, "
                f"rope_dim={self.rope_dim!r}"
            )
        if self.rope_dim is not None:
            _check_int("rope_dim", self.rope_dim, minimum=0)

    @property
    def is_mla(self) -> bool:
        return self.kv_rank is not None

    @property
    def n_window_layers(self) -> int:
        if self.window is None:
            return 0
        return self.layers if self.window_layers is None else len(self.window_layers)

    @property
    def values_per_token_layer(self) -> int:
        """Values one layer caches per token: K and V of every KV head, or MLA's latent + key."""
        if self.is_mla:
            return self.kv_rank + self.rope_dim
        return self.kv_heads * (self.head_dim + (self.v_head_dim or self.head_dim))


def kv_bytes_per_token_layer(spec: KVSpec, dtype: str | torch.dtype = "bf16") -> int:
    """Bytes one layer's cache takes per token (rounded up to whole bytes)."""
    return _bytes(spec.values_per_token_layer * dtype_bits(dtype))


def kv_bytes_per_token(spec: KVSpec, dtype: str | torch.dtype = "bf16") -> int:
    """Bytes all layers cache per token, before any sliding window caps them."""
    return _bytes(spec.layers * spec.values_per_token_layer * dtype_bits(dtype))


def _kv_bits(spec: KVSpec, context: int, batch: int, dtype: str | torch.dtype) -> int:
    capped = min(context, spec.window) if spec.window is not None else context
    windowed = spec.n_window_layers
    tokens = windowed * capped + (spec.layers - windowed) * context  # summed over layers
    return batch * tokens * spec.values_per_token_layer * dtype_bits(dtype)


def kv_bytes(spec: KVSpec, context: int, batch: int = 1, dtype: str | torch.dtype = "bf16") -> int:
    """Bytes of the KV cache for `batch` requests of `context` tokens (window layers: <= W)."""
    _check_int("context", context, minimum=0)
    _check_int("batch", batch)
    return _bytes(_kv_bits(spec, context, batch, dtype))


def weights_bytes(spec: KVSpec, dtype: str | torch.dtype = "bf16") -> int:
    """Bytes of the weights at `dtype` (no quantization scales); needs `spec.params`."""
    if spec.params is None:
        raise ValueError(f"{spec.name}: the parameter count is unknown (params is None)")
    return _bytes(spec.params * dtype_bits(dtype))


def _free_bits(spec: KVSpec, gpu_bytes: int, weights_dtype: str | torch.dtype | None) -> int:
    _check_int("gpu_bytes", gpu_bytes)
    weights = 0 if weights_dtype is None else weights_bytes(spec, weights_dtype)
    return max(gpu_bytes - weights, 0) * 8


def max_batch(
    spec: KVSpec,
    context: int,
    gpu_bytes: int,
    dtype: str | torch.dtype = "bf16",
    weights_dtype: str | torch.dtype | None = "bf16",
) -> int:
    """Most requests of `context` tokens whose KV cache fits beside the weights.

    `weights_dtype=None` leaves the weights out (the whole `gpu_bytes` is for the cache).
    """
    _check_int("context", context)
    return _free_bits(spec, gpu_bytes, weights_dtype) // _kv_bits(spec, context, 1, dtype)


def max_context(
    spec: KVSpec,
    batch: int,
    gpu_bytes: int,
    dtype: str | torch.dtype = "bf16",
    weights_dtype: str | torch.dtype | None = "bf16",
) -> int | None:
    """Longest context for which `batch` requests fit; None when unbounded (all layers windowed)."""
    _check_int("batch", batch)
    free = _free_bits(spec, gpu_bytes, weights_dtype)
    global_layers = spec.layers - spec.n_window_layers
    if global_layers == 0 and _kv_bits(spec, spec.window, batch, dtype) <= free:
        return None
    per_token = batch * spec.values_per_token_layer * dtype_bits(dtype)
    lo, hi = 0, free // (per_token * max(global_layers, 1)) + (spec.window or 0) + 1
    while lo < hi:  # largest n with bits(n) <= free; bits(hi) > free
        mid = (lo + hi + 1) // 2
        if _kv_bits(spec, mid, batch, dtype) <= free:
            lo = mid
        else:
            hi = mid - 1
    return lo
