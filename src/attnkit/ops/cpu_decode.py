"""The fused CPU decode-attention kernel (csrc/decode_attention.cpp), built on first use.

`attnkit.ops.cpp_build` compiles it the first time a `cpp` backend is asked for (~40 s with
g++ 12 on 2 cores; a cached build loads in ~0.2 s in a new process), for the host CPU:
the baseline x86-64 build (SSE2) read K/V ~6x slower on an AVX-512 machine, far from
memory speed.

`cpu_decode_available()` says whether the kernel can be had (building it if needed) and
`cpu_decode_unavailable_reason()` why not; the explicit `cpp` backends raise that reason,
`auto` falls back to torch.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from attnkit.ops.cpp_build import load_kernel, unavailable_reason
from attnkit.ops.transforms import kernel_refusal, transform_active

SOURCE_NAME = "decode_attention.cpp"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def cpu_decode_available() -> bool:
    """True when the C++ decode kernel is built and loaded (building it on the first call)."""
    return loaded_kernel() is not None


def cpu_decode_unavailable_reason() -> str | None:
    """Why the C++ decode kernel cannot be used (None when it can); tries the build first."""
    return unavailable_reason(SOURCE_NAME)


def can_take(q: Tensor, *kv: Tensor) -> bool:
    """Whether `auto` may pick the kernel: CPU, a supported dtype, no gradient wanted."""
    return request_limits(q, *kv) is None and cpu_decode_available()


def check_request(q: Tensor, *kv: Tensor) -> None:
    """Raise why an explicit `cpp` backend cannot serve this request, if it cannot."""
    reason = request_limits(q, *kv)
    if reason is not None:
        raise ValueError(reason)
    require_kernel()


def request_limits(q: Tensor, *kv: Tensor) -> str | None:
    """Why the kernel cannot serve these inputs (device, dtype, gradients), or None."""
    if not q.is_cpu:
        return f"the cpp backend takes CPU tensors, got {q.device}"
    if q.dtype not in DTYPES:
        return f"the cpp backend takes float32, float64, bfloat16 or float16, got {q.dtype}"
    return kernel_refusal("the cpp backend", q, *kv)


def decode_contiguous(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor | None,
    scale: float,
    num_splits=None,
    scales: tuple[Tensor, Tensor] | None = None,
    module: ModuleType | None = None,
    window: int | None = None,
    sinks: int = 0,
) -> tuple[Tensor, Tensor]:
    """The kernel on contiguous-cache K/V `(batch, kv_heads, n, d)`, read in place as a pool
    of `batch` blocks of n tokens. q is `(batch, heads, d)` or `(batch, heads, 1, d)`; out
    and lse come shaped as q (with v's head dim). Int8 K/V come with `scales` (k's, v's),
    `(batch, kv_heads, n)` float32: one per row. `module`: the kernel, where the caller has
    it (else loaded here). `window`, `sinks`: each query sees only the last `window` of its
    keys and the first `sinks`."""
    rows = (None, None) if scales is None else scales
    return cpp_decode(
        q, k, v, None, lengths, scale, num_splits, rows, heads_before_tokens=True,
        window=window, sinks=sinks, module=module,
    )  # fmt: skip


def plain_paged_decode(
    q: object,
    k_pool: object,
    v_pool: object,
    block_table: object,
    lengths: object,
    scale: object,
    num_splits: object,
    window: object = None,
    sinks: object = 0,
) -> tuple[Tensor, Tensor] | None:
    """`paged_decode`'s short way, for `auto` or `cpp`: the kernel's (out, lse) for a plain
    call (dense CPU tensors of the shapes and dtypes the kernel takes, integer block_table and
    lengths, `scale` None or a positive float, `num_splits` None or a positive int, `window`
    None or a positive int with `sinks` a non-negative int, 0 without a window), or None
    for any other call, valid or not, which then takes the full path (its checks name what
    is wrong). The tensors are checked in the kernel module (`try_paged_decode`): in Python,
    the full path's checks and choice of backend cost ~50 us from cold caches and ~4 us hot,
    on a kernel call of ~45 (16 tokens). Bad lengths or block ids raise as on the full path
    (the kernel checks them, with its messages)."""
    if not (
        type(q) is Tensor
        and type(k_pool) is Tensor
        and type(v_pool) is Tensor
        and type(block_table) is Tensor
        and type(lengths) is Tensor
    ):
        return None  # subclasses and non-tensors take the full path
    if num_splits is not None and not (type(num_splits) is int and 1 <= num_splits < 2**63):
        return None
    if window is None:
        window = 0  # the kernel's "no window"
    elif not (type(window) is int and 1 <= window < 2**63):
        return None
    if not (type(sinks) is int and 0 <= sinks < 2**63) or (sinks and not window):
        return None
    module, scale = short_way_kernel(q), kernel_scale(scale)
    if module is None or scale is None:
        return None
    splits = num_splits or 0  # 0: the kernel's choice
    return module.try_paged_decode(
        q, k_pool, v_pool, block_table, lengths, scale, splits, window, sinks
    )


def short_way_kernel(q: Tensor) -> ModuleType | None:
    """The kernel module for a short way's call, where q lies on the CPU, no transform runs
    (`transform_active`) and the kernel can be had. q's device is asked first, so that a GPU
    call never builds the CPU kernel."""
    return loaded_kernel() if q.is_cpu and not transform_active() else None


def kernel_scale(scale: object) -> float | None:
    """`scale` as the module's `try_decode` / `try_paged_decode` take it (0.0: 1 / sqrt(d)),
    or None where it is not None or a positive finite float (the full path checks it)."""
    if scale is None:
        return 0.0
    return scale if type(scale) is float and 0.0 < scale < math.inf else None


def loaded_kernel() -> ModuleType | None:
    """The compiled kernel module (built on the first call), or None where it cannot be had."""
    return load_kernel(SOURCE_NAME)


def require_kernel() -> ModuleType:
    """The compiled kernel module, or a RuntimeError saying why it is not available."""
    module = loaded_kernel()
    if module is None:
        raise RuntimeError(f"backend='cpp' is not available: {unavailable_reason(SOURCE_NAME)}")
    return module


def cpp_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_table: Tensor | None,
    lengths: Tensor | None,
    scale: float,
    num_splits: int | None,
    scales: tuple[Tensor | None, Tensor | None] = (None, None),
    *,
    heads_before_tokens: bool = False,
    window: int | None = None,
    sinks: int = 0,
    module: ModuleType | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the kernel: q (batch, heads[, 1], d); k/v (num_blocks, block_size, kv_heads,
    d / dv), or `(num_blocks, kv_heads, block_size, ...)` with `heads_before_tokens` (a
    contiguous cache); any strides, a last dim that is not contiguous copied (slow).

    `block_table` None means sequence b is block b (a contiguous cache); `lengths` None means
    every sequence fills its block. Int8 k/v (with a float32 q) need `scales`, k's and v's
    float32, one per row, their dims ordered as k's without the last. `window`, `sinks`: each
    query sees only its sequence's last `window` tokens and first `sinks`. Shapes must already be
    checked; the kernel checks lengths and block ids itself (it reads raw memory). Returns
    out (batch, heads[, 1], dv) in q's dtype and lse (batch, heads[, 1]), float64 for
    float64 inputs and float32 otherwise. No other torch op runs here: each would cost a
    few microseconds a call (tens from cold caches), on a kernel call of ~10.
    """
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    module = module or require_kernel()
    splits = num_splits or 0
    out_lse = module.decode(
        q, k, v, block_table, lengths, float(scale), splits, *scales, heads_before_tokens,
        window or 0, sinks,  # window 0: every key (sinks are then ignored)
    )  # fmt: skip
    return tuple(out_lse)
