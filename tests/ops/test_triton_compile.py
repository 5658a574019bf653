"""attnkit's Triton kernels compile for an H100/H200 (sm_90), checked without a GPU.

The interpreter tests check what the kernels compute; this checks that the GPU compiler
takes them (Triton lowers to PTX and runs its bundled ptxas on the host). It runs
tests/ops/compile_for_gpu.py in a process of its own, without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
KERNELS = 3 * 2 * 2 + 2 + 2  # prefill dtypes x masked x sparse, latent decode x2, paged + merge


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    failed = [line for line in lines if "FAILED" in line]
    assert done.returncode == 0, done.stderr[-3000:]
    assert not failed, "\n".join(failed)
    assert len(lines) == KERNELS and all(line.endswith(": ok") for line in lines), lines
