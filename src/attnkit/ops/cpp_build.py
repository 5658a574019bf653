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

The decode-step kernels (`WIDE_VECTOR_SOURCES`) keep tiles of accumulators in vector
registers, sized (vec.h) for AVX-512's 32 registers of 64 bytes or AVX2's 16 of 32 bytes.
They serve hosts with either; elsewhere (ARM, x86 without AVX2) they are untimed against
torch, so such hosts get None and the torch paths (`ATTNKIT_WIDE_VECTOR_KERNELS=1` builds
them anyway: the test suite does, so their correctness is checked on any host). The other
kernels serve every host.

`ATTNKIT_CPU_ARCH` (an x86 `-march` value, default `native`) builds for another target: with
`x86-64-v3` an AVX-512 machine builds and tests the AVX2 code (`make test` does).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"

WIDE_VECTOR_SOURCES = frozenset(
    {"decode_attention.cpp", "decode_block.cpp", "packed_linear.cpp", "skinny_linear.cpp"}
)

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


@functools.cache
def cpp_kernels_enabled() -> bool:
    """False when ATTNKIT_NO_CPP is set to anything but 0 or an empty string: read once per
    process, as every kernel call asks (a read of os.environ cost 0.7 us hot and 10-15 us
    from cold caches, on a decode call of 8 and 70); `cpp_kernels_enabled.cache_clear()`
    reads it again."""
    return os.environ.get("ATTNKIT_NO_CPP", "0") in ("", "0")


@functools.cache
def has_wide_vectors() -> bool:
    """Whether this CPU has the vector units the decode-step kernels are tuned for: AVX-512
    or AVX2 (the hardware's, whatever `ATTNKIT_CPU_ARCH` asks the build for). Asked once
    per process (a decode step loads kernels ~120 times)."""
    return _cpu_has("avx512") or _cpu_has("avx2")


def _cpu_has(isa: str) -> bool:
    """The hardware's answer (torch's check of the CPU, not its `ATEN_CPU_CAPABILITY`
    dispatch setting), or torch's dispatch level where this torch lacks the check."""
    check = getattr(torch.cpu, f"_is_{isa}_supported", None)
    if check is not None:
        return bool(check())
    capability = torch.backends.cpu.get_cpu_capability()
    return capability == isa.upper() or (isa == "avx2" and capability == "AVX512")


def _wide_vectors_forced() -> bool:
    return os.environ.get("ATTNKIT_WIDE_VECTOR_KERNELS", "0") == "1"


def _get(source: str) -> ModuleType | str:
    if not cpp_kernels_enabled():
        return "ATTNKIT_NO_CPP is set: attnkit's C++ kernels are switched off"
    if source in WIDE_VECTOR_SOURCES and not (has_wide_vectors() or _wide_vectors_forced()):
        return (
            f"{source} is tuned for AVX-512 or AVX2 and this CPU has neither: untimed here "
            "against torch, so torch serves (ATTNKIT_WIDE_VECTOR_KERNELS=1 builds it anyway)"
        )
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
        flags.append(f"-march={target_arch()}")
    return flags


def target_arch() -> str:
    """The x86-64 architecture the kernels are built for: the host's own (`native`), or
    `ATTNKIT_CPU_ARCH` (e.g. `x86-64-v3`: AVX2 and FMA without AVX-512; GCC 11 or newer),
    which lets an AVX-512 machine build and test the code an AVX2 host runs. A target with
    instructions this CPU lacks builds kernels that kill the process (illegal instruction)."""
    arch = os.environ.get("ATTNKIT_CPU_ARCH", "") or "native"
    if not all(c.isalnum() or c in "-_." for c in arch):
        raise ValueError(
            f"ATTNKIT_CPU_ARCH={arch!r} is not an architecture name: expected a -march value "
            "such as native, x86-64-v3 or skylake-avx512"
        )
    return arch


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
