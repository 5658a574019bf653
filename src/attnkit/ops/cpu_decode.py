"""The fused CPU decode-attention kernel (csrc/decode_attention.cpp), built on first use.

The C++ source ships inside the package and is compiled once per process, the first time a
`cpp` backend is asked for, with `torch.utils.cpp_extension.load` into torch's extensions
directory (`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`). Later processes
reuse the build: only a changed source, compiler flag or machine rebuilds it. The first
build takes ~40 s (g++ 12, 2 cores); loading a cached build in a new process ~0.2 s.

On x86-64 it is compiled for the host CPU (`-march=native`): the baseline x86-64 build
(SSE2) read K/V ~6x slower on an AVX-512 machine, far from memory speed. The build's name
therefore carries a hash of the CPU's model and flags, so a home directory shared between
different machines keeps one build per kind of CPU. Other architectures get no `-march`
flag (portable, and slower).

`cpu_decode_available()` says whether the kernel can be had (building it if needed) and
`cpu_decode_unavailable_reason()` why not; the explicit `cpp` backends raise that reason,
`auto` falls back to torch.
"""

from __future__ import annotations

import hashlib
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "module" once built, or "error" with the reason it failed


def cpu_decode_available() -> bool:
    """True when the C++ decode kernel is built and loaded (building it on the first call)."""
    return _load() is not None


def cpu_decode_unavailable_reason() -> str | None:
    """Why the C++ decode kernel cannot be used (None when it can); tries the build first."""
    _load()
    return _state.get("error")  # type: ignore[return-value]


def can_take(q: Tensor, *kv: Tensor) -> bool:
    """Whether `auto` may pick the kernel: CPU, a supported dtype, no gradient wanted."""
    return (
        q.device.type == "cpu"
        and q.dtype in DTYPES
        and not _wants_grad(q, *kv)
        and cpu_decode_available()
    )


def check_request(q: Tensor, *kv: Tensor) -> None:
    """Raise why an explicit `cpp` backend cannot serve this request, if it cannot."""
    if q.device.type != "cpu":
        raise ValueError(f"the cpp backend takes CPU tensors, got {q.device}")
    if q.dtype not in DTYPES:
        raise ValueError(
            f"the cpp backend takes float32, float64, bfloat16 or float16, got {q.dtype}"
        )
    if _wants_grad(q, *kv):
        raise ValueError(
            "the cpp backend computes no gradients, but an input requires grad: use "
            "backend='torch', or call it under torch.no_grad()"
        )
    require_kernel()


def _wants_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def require_kernel() -> ModuleType:
    """The compiled kernel module, or a RuntimeError saying why it is not available."""
    module = _load()
    if module is None:
        raise RuntimeError(f"backend='cpp' is not available: {_state['error']}")
    return module


def cpp_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_table: Tensor | None,
    lengths: Tensor | None,
    scale: float,
    num_splits: int | None,
) -> tuple[Tensor, Tensor]:
    """Run the kernel: q (batch, heads, d); k/v (num_blocks, block_size, kv_heads, d / dv).

    `block_table` None means sequence b is block b (a contiguous cache); `lengths` None means
    every sequence fills its block. Shapes must already be checked; the kernel checks lengths
    and block ids itself (it reads raw memory). Returns out (batch, heads, dv) in q's dtype
    and lse (batch, heads), float64 for float64 inputs and float32 otherwise.
    """
    module = require_kernel()
    return tuple(module.decode(q, k, v, block_table, lengths, float(scale), num_splits or 0))


def _load() -> ModuleType | None:
    if "module" in _state or "error" in _state:
        return _state.get("module")  # type: ignore[return-value]
    with _lock:
        if "module" not in _state and "error" not in _state:
            try:
                _state["module"] = _build()
            except Exception as error:  # no compiler, no headers, a failed compile, ...
                _state["error"] = f"{type(error).__name__}: {error}".strip()
    return _state.get("module")  # type: ignore[return-value]


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    if not SOURCE.is_file():
        raise FileNotFoundError(f"the kernel source {SOURCE} is missing from the installation")
    flags = _compile_flags()
    return load(
        name=_build_name(flags),
        sources=[str(SOURCE)],
        extra_cflags=flags,
        verbose=False,
    )


def _compile_flags() -> list[str]:
    # -fopenmp: at::parallel_for's OpenMP region is compiled into this module (libtorch
    # provides the runtime); it also honours `#pragma omp simd`.
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    return flags


def _build_name(flags: list[str]) -> str:
    """`attnkit_decode_<hash>`: one build per CPU kind (flags are host-specific) and torch."""
    key = "|".join([torch.__version__, platform.machine(), _cpu_identity(), *flags])
    return "attnkit_decode_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else whatever platform can tell."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = {line.split(":", 1)[0].strip(): line for line in info.splitlines() if ":" in line}
    return "\n".join(lines[key] for key in wanted if key in lines) or platform.processor()
