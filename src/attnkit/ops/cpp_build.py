"""Build attnkit's C++ CPU kernels (csrc/*.cpp) on first use, once per machine kind.

Each kernel source ships inside the package and is compiled the first time it is asked
for, with `torch.utils.cpp_extension.load`, into torch's extensions directory
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`); later processes reuse the
build. On x86-64 it is compiled for the host CPU (`-march=native`: AVX-512 or AVX2 is what
lets the kernels stream memory at full speed), so the build's name carries a hash of the
CPU's model and flags and of torch's version: a home directory shared by different
machines keeps one build per kind of CPU. A machine without a compiler gets `None` and the
reason, and callers fall back to plain torch; so does every machine with `ATTNKIT_NO_CPP=1`
(to compare against plain torch, or to rule the kernels out).
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"

_lock = threading.Lock()
_built: dict[str, ModuleType | str] = {}  # source name -> module, or the reason it failed


def load_kernel(source: str) -> ModuleType | None:
    """The compiled module for `csrc/<source>` (building it on the first call), or None."""
    result = _get(source)
    return result if isinstance(result, ModuleType) else None


def unavailable_reason(source: str) -> str | None:
    """Why `csrc/<source>` cannot be used (None when it can); tries the build first."""
    result = _get(source)
    return None if isinstance(result, ModuleType) else result


def wants_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would need a backward through these inputs: the C++ kernels have
    none, so their callers take a torch path (or decline) when this is True."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def cpp_kernels_enabled() -> bool:
    """False when ATTNKIT_NO_CPP is set to anything but 0 or an empty string."""
    return os.environ.get("ATTNKIT_NO_CPP", "0") in ("", "0")


def _get(source: str) -> ModuleType | str:
    if not cpp_kernels_enabled():
        return "ATTNKIT_NO_CPP is set: attnkit's C++ kernels are switched off"
    if source not in _built:
        with _lock:
            if source not in _built:
                try:
                    _built[source] = _build(CSRC / source)
                except Exception as error:  # no compiler, no headers, a failed compile, ...
                    _built[source] = f"{type(error).__name__}: {error}".strip()
    return _built[source]


def _build(path: Path) -> ModuleType:
    from torch.utils.cpp_extension import load

    if not path.is_file():
        raise FileNotFoundError(f"the kernel source {path} is missing from the installation")
    _put_ninja_on_path()
    flags = compile_flags()
    return load(
        name=build_name(path.stem, flags),
        sources=[str(path)],
        extra_cflags=flags,
        extra_include_paths=[str(CSRC)],  # vec.h, shared by the kernels
        verbose=False,
    )


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the `ninja` wheel's binary sits in the environment's
    bin folder, which is not on PATH when the environment's python runs unactivated."""
    try:
        import ninja
    except ImportError:
        return  # then a system ninja on PATH, or the build fails with torch's message
    folders = os.environ.get("PATH", "").split(os.pathsep)
    if ninja.BIN_DIR not in folders:
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, *folders])


def compile_flags() -> list[str]:
    # -fopenmp: at::parallel_for's OpenMP region is compiled into the module (libtorch
    # provides the runtime); it also honours `#pragma omp simd`.
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-march=native")
    return flags


def build_name(stem: str, flags: list[str]) -> str:
    """`attnkit_<stem>_<hash>`: one build per CPU kind (flags are host-specific), torch, and
    version of the shared headers (torch's rebuild check hashes only the .cpp source)."""
    headers = [path.read_text() for path in sorted(CSRC.glob("*.h"))]
    key = "|".join([torch.__version__, platform.machine(), _cpu_identity(), *flags, *headers])
    return f"attnkit_{stem}_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def _cpu_identity() -> str:
    """The CPU's model and feature flags (Linux), else whatever platform can tell."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    lines = {line.split(":", 1)[0].strip(): line for line in info.splitlines() if ":" in line}
    return "\n".join(lines[key] for key in wanted if key in lines) or platform.processor()
