"""KV-cache and weights memory as pure functions of a model's attention config.

Nothing here allocates: every number is computed from a `KVSpec`, and the cache predictors
(`contiguous_cache_bytes` ...) reproduce the `nbytes` of attnkit's own caches exactly
(tests fill real caches and compare). Sizes are counted in bits internally so that int4
(half a byte per value) stays exact; byte totals round up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

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


WHAT_IF_WINDOW = 4096
WHAT_IF_MLA_RANKS = (256, 512)
WHAT_IF_DTYPES = ("fp8", "int4")


def what_if_variants(
    spec: KVSpec, dtype: str = "bf16", window: int = WHAT_IF_WINDOW
) -> list[tuple[str, KVSpec, str]]:
    """Alternative attention layouts for the same model: `(label, spec, kv dtype)` rows.

    The first row is the model as shipped. Then MHA, GQA with every other power-of-two
    group count that divides the query heads, MQA, MLA at a few latent ranks (RoPE key 64,
    as DeepSeek), a sliding window on every layer, and lower-precision KV.
    """
    plain = replace(spec, kv_rank=None, rope_dim=None, window=None, window_layers=None)
    rows = [
        ("as shipped", spec, dtype),
        (f"MHA ({spec.heads} KV heads)", replace(plain, kv_heads=spec.heads), dtype),
    ]
    shipped_kv = None if spec.is_mla else spec.kv_heads
    for kv in (2**i for i in range(1, spec.heads.bit_length())):
        if spec.heads % kv == 0 and kv not in (spec.heads, shipped_kv):
            rows.append((f"GQA {kv} KV heads", replace(plain, kv_heads=kv), dtype))
    rows.append(("MQA (1 KV head)", replace(plain, kv_heads=1), dtype))
    for rank in WHAT_IF_MLA_RANKS:
        mla = replace(spec, kv_rank=rank, rope_dim=64, window=None, window_layers=None)
        rows.append((f"MLA rank {rank} + RoPE 64", mla, dtype))
    if spec.window != window or spec.n_window_layers != spec.layers:
        windowed = replace(spec, window=window, window_layers=None)
        rows.append((f"window {window}, all layers", windowed, dtype))
    rows.extend((f"KV {d}", spec, d) for d in WHAT_IF_DTYPES if d != dtype)
    return rows


def what_if_table(spec: KVSpec, context: int, dtype: str = "bf16") -> list[dict]:
    """`what_if_variants` with bytes per token, per request at `context`, and saving factor."""
    shipped = kv_bytes(spec, context, 1, dtype)
    rows = []
    for label, variant, kv_dtype in what_if_variants(spec, dtype):
        request = kv_bytes(variant, context, 1, kv_dtype)
        rows.append(
            {
                "variant": label,
                "dtype": kv_dtype,
                "kv_bytes_per_token": kv_bytes_per_token(variant, kv_dtype),
                "kv_bytes_per_request": request,
                "saving": shipped / request if request else math.inf,
            }
        )
    return rows


# -- predictors for attnkit's caches ----------------------------------------------------------


def _plain_values(spec: KVSpec) -> int:
    if spec.is_mla:
        raise ValueError(f"{spec.name}: attnkit's K/V caches store per-head K/V, not MLA latents")
    return spec.head_dim + (spec.v_head_dim or spec.head_dim)


def contiguous_capacity(
    tokens: int, max_len: int | None = None, initial_len: int = 256, step: int | None = None
) -> int:
    """`ContiguousCache.capacity` after its longest sequence reached `tokens` in `step`s.

    Without `max_len`, a step needing more than the capacity grows it to
    `max(needed, 2 * capacity)`; `step=None` means all tokens in one prefill.
    """
    if max_len is not None:
        return max_len
    capacity, length = initial_len, 0
    while length < tokens:
        length = min(tokens, length + (step or tokens))
        if length > capacity:
            capacity = max(length, 2 * capacity)
    return capacity


def contiguous_cache_bytes(
    spec: KVSpec,
    *,
    max_seqs: int = 1,
    max_len: int | None = None,
    initial_len: int = 256,
    tokens: int = 0,
    step: int | None = None,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`ContiguousCache.nbytes`: K and V buffers preallocated for `max_seqs` x capacity."""
    capacity = contiguous_capacity(tokens, max_len, initial_len, step)
    values = spec.layers * max_seqs * spec.kv_heads * capacity * _plain_values(spec)
    return _bytes(values * dtype_bits(dtype))


def paged_pool_bytes(
    spec: KVSpec, *, num_blocks: int, block_size: int = 16, dtype: str | torch.dtype = torch.float32
) -> int:
    """`PagedCache.nbytes`: the whole block pool, every layer, K and V."""
    values = spec.layers * num_blocks * block_size * spec.kv_heads * _plain_values(spec)
    return _bytes(values * dtype_bits(dtype))


def paged_cache_bytes(
    spec: KVSpec,
    tokens: int | Sequence[int],
    *,
    block_size: int = 16,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`PagedCache.used_nbytes` for unshared sequences of these lengths: whole blocks each."""
    lengths = [tokens] if isinstance(tokens, int) else list(tokens)
    blocks = sum(-(-n // block_size) for n in lengths)
    return paged_pool_bytes(spec, num_blocks=blocks, block_size=block_size, dtype=dtype)


def window_cache_bytes(
    spec: KVSpec,
    *,
    window: int,
    sinks: int = 0,
    max_seqs: int = 1,
    max_new_per_step: int = 512,
    dtype: str | torch.dtype = torch.float32,
) -> int:
    """`SlidingWindowCache.nbytes`: sinks + a ring of `window - 1 + max_new_per_step` slots.

    Plus its int64 table of the position held by each slot; independent of length.
    """
    capacity = sinks + window - 1 + max_new_per_step
    kv = contiguous_cache_bytes(spec, max_seqs=max_seqs, max_len=capacity, dtype=dtype)
    return kv + max_seqs * capacity * 8


def quantized_cache_bytes(
    spec: KVSpec,
    *,
    max_seqs: int = 1,
    max_len: int | None = None,
    initial_len: int = 256,
    tokens: int = 0,
    step: int | None = None,
    scale_dtype: str | torch.dtype = torch.float32,
) -> int:
    """`QuantizedCache.nbytes`: int8 K/V plus one scale per (token, KV head) for K and V."""
    capacity = contiguous_capacity(tokens, max_len, initial_len, step)
    data = contiguous_cache_bytes(spec, max_seqs=max_seqs, max_len=capacity, dtype="int8")
    scales = 2 * spec.layers * max_seqs * spec.kv_heads * capacity * dtype_bits(scale_dtype)
    return data + _bytes(scales)


# -- a whole report (what `attnkit memory` prints) -------------------------------------------

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """Bytes from '80GB' (10^9), '80GiB' (2^30), '512MB', '1e9B'; a bare number means GB."""
    cleaned = text.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if cleaned.endswith(u)), "GB")
    number = cleaned[: len(cleaned) - len(unit)] if cleaned.endswith(unit) else cleaned
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"expected a size such as 80GB or 24GiB, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"expected a positive size such as 80GB, got {text!r}")
    return int(value)


def memory_report(
    spec: KVSpec,
    *,
    context: int,
    batch: int = 1,
    dtype: str = "bf16",
    gpu_bytes: int | None = None,
    weights_dtype: str = "bf16",
) -> dict:
    """Everything `attnkit memory` shows, as a JSON-ready dict."""
    weights = None if spec.params is None else weights_bytes(spec, weights_dtype)
    report = {
        "model": spec.name,
        "spec": {k: v for k, v in spec.__dict__.items() if k != "name"},
        "dtype": dtype,
        "weights_dtype": weights_dtype,
        "context": context,
        "batch": batch,
        "kv_bytes_per_token_per_layer": kv_bytes_per_token_layer(spec, dtype),
        "kv_bytes_per_token": kv_bytes_per_token(spec, dtype),
        "kv_bytes_per_request": kv_bytes(spec, context, 1, dtype),
        "kv_bytes_batch": kv_bytes(spec, context, batch, dtype),
        "weights_bytes": weights,
        "gpu_bytes": gpu_bytes,
        "max_batch": None,
        "max_context": None,
        "max_context_unbounded": False,
        "what_if": what_if_table(spec, context, dtype),
    }
    if report["spec"]["window_layers"] is not None:
        report["spec"]["window_layers"] = list(spec.window_layers)
    if gpu_bytes is not None:
        if weights is None:
            raise ValueError(
                f"{spec.name}: the parameter count is unknown, so the weights' "
                "share of --gpu-memory is too"
            )
        report["max_batch"] = max_batch(spec, context, gpu_bytes, dtype, weights_dtype)
        longest = max_context(spec, batch, gpu_bytes, dtype, weights_dtype)
        report["max_context"] = longest
        report["max_context_unbounded"] = longest is None
    return report
