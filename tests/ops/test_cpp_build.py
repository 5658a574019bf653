"""cpp_build: one build per CPU kind, torch, flags and shared-header version; vectors of
the target's register width; the decode kernels only where the CPU has AVX-512 or AVX2,
torch's paths elsewhere."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import attnkit
from attnkit.models.llama import LlamaConfig, Transformer
from attnkit.ops import cpp_build, cpu_decode


def test_a_changed_shared_header_gets_a_new_build_name(tmp_path, monkeypatch):
    # torch's rebuild check hashes only the .cpp source; a kernel whose header changed must
    # not load the old build
    monkeypatch.setattr(cpp_build, "CSRC", tmp_path)
    header = tmp_path / "vec.h"
    header.write_text("// version 1\n")
    flags = cpp_build.compile_flags()
    first = cpp_build.build_name("decode_attention", flags)
    assert cpp_build.build_name("decode_attention", flags) == first
    header.write_text("// version 2\n")
    second = cpp_build.build_name("decode_attention", flags)
    assert second != first
    assert second.startswith("attnkit_decode_attention_")
    assert cpp_build.build_name("decode_attention", [*flags, "-DX"]) != second


def _without_vector_units(monkeypatch):
    monkeypatch.delenv("ATTNKIT_WIDE_VECTOR_KERNELS", raising=False)  # tests/conftest.py sets it
    monkeypatch.setattr(cpp_build, "has_wide_vectors", lambda: False)


@pytest.mark.parametrize(
    ("avx512", "avx2", "expected"),
    [(True, True, True), (False, True, True), (False, False, False)],
)
def test_wide_vectors_means_the_cpu_runs_avx512_or_avx2(monkeypatch, avx512, avx2, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: avx512)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: avx2)
    cpp_build.has_wide_vectors.cache_clear()
    try:
        assert cpp_build.has_wide_vectors() is expected
    finally:
        cpp_build.has_wide_vectors.cache_clear()


def test_hosts_without_vector_units_leave_the_decode_kernels_to_torch(monkeypatch):
    _without_vector_units(monkeypatch)
    for source in sorted(cpp_build.WIDE_VECTOR_SOURCES):
        assert cpp_build.load_kernel(source) is None
        reason = cpp_build.unavailable_reason(source)
        assert "tuned for AVX-512 or AVX2" in reason and "has neither" in reason, reason
    for source in ("banded_attention.cpp", "rms_norm.cpp", "fma_peak.cpp"):  # every host
        assert cpp_build.load_kernel(source) is not None, cpp_build.unavailable_reason(source)
    monkeypatch.setenv("ATTNKIT_WIDE_VECTOR_KERNELS", "1")  # built anyway when asked
    assert cpp_build.load_kernel("decode_attention.cpp") is not None


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="-march targets are x86's"
)
def test_kernels_use_the_register_width_of_their_target():
    # the compiler's own answer for these flags (ATTNKIT_CPU_ARCH=x86-64-v3 reruns the
    # kernel tests as AVX2 code: make test): 64-byte vectors with AVX-512, else 32
    compiler = os.environ.get("CXX", "c++")  # as torch's builds use
    macros = subprocess.run(
        [compiler, *cpp_build.compile_flags(), "-dM", "-E", "-x", "c++", "/dev/null"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    width = 64 if "#define __AVX512F__ 1" in macros else 32
    built = {
        "packed_linear": cpp_build.load_kernel("packed_linear.cpp").VECTOR_BYTES,
        "decode_block": cpp_build.load_kernel("decode_block.cpp").VECTOR_BYTES,
        "banded rows": cpp_build.load_kernel("banded_attention.cpp").BLOCK_ROWS,
    }
    assert built == {"packed_linear": width, "decode_block": width, "banded rows": width // 2}


def test_the_target_arch_is_a_plain_name(monkeypatch):
    monkeypatch.setenv("ATTNKIT_CPU_ARCH", "x86-64-v3")
    assert cpp_build.target_arch() == "x86-64-v3"
    monkeypatch.setenv("ATTNKIT_CPU_ARCH", "")
    assert cpp_build.target_arch() == "native"
    monkeypatch.setenv("ATTNKIT_CPU_ARCH", "native -fno-strict-aliasing")
    with pytest.raises(ValueError, match=r"ATTNKIT_CPU_ARCH='native -fno-strict-aliasing'.*-march"):
        cpp_build.target_arch()


def test_a_decode_step_without_the_decode_kernels_gives_the_same_logits(monkeypatch):
    config = LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2,
    )  # fmt: skip
    prompt, token = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 1))

    def step():
        torch.manual_seed(0)
        model = Transformer(config).eval()  # fresh: a model keeps the decode stack it built
        cache = model.new_cache(2)
        with torch.inference_mode():
            model(prompt, cache)
            logits = model(token, cache)
        plan = model._stacked_decode._plan
        return logits, plan is not None and bool(plan._stacks)  # a stack built and run

    calls = []  # the decode attention kernel module's entry points, watched
    kernel = cpu_decode.loaded_kernel()
    for entry in ("decode", "try_decode", "try_paged_decode"):
        real = getattr(kernel, entry)
        spy = lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
        monkeypatch.setattr(kernel, entry, spy)
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    attnkit.attention(q, k, k)  # a decode call on this host: the spies see the kernel run
    assert calls
    calls.clear()
    fused, stacked = step()
    assert stacked  # the decode step ran as one C++ call
    _without_vector_units(monkeypatch)
    plain, stacked = step()
    assert not stacked and not calls  # torch's ops: no stack, no C++ decode attention
    # float32 sums in another order (fused kernels vs torch ops) over logits of size ~1
    torch.testing.assert_close(plain, fused, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("value", "enabled"), [("1", False), ("yes", False), ("0", True), ("", True)]
)
def test_attnkit_no_cpp_is_read_when_the_process_starts_asking(value, enabled):
    # Read once per process (cached: each kernel call asks), so a fresh process sees it.
    probe = (
        "from attnkit.ops import cpp_build, cpu_decode; "
        "print(cpp_build.cpp_kernels_enabled(), cpu_decode.cpu_decode_unavailable_reason())"
    )
    env = {**os.environ, "ATTNKIT_NO_CPP": value}
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    said_enabled, reason = done.stdout.split(" ", 1)
    assert said_enabled == str(enabled)
    assert ("ATTNKIT_NO_CPP is set" in reason) != enabled
