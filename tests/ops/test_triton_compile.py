"""attnkit's Triton kernels compile for an H100/H200 (sm_90), checked without a GPU.

The interpreter tests check what the kernels compute; this checks that the GPU compiler
takes them (Triton lowers to PTX and runs its bundled ptxas on the host) and that each
asks for no more shared memory per block than the GPUs it is meant for hold (99 KB, or
the A100/H100's for float32 past head dim 128). It runs tests/ops/compile_for_gpu.py in a
process of its own, without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")
# prefill: dtypes x masked x sparse x head dims 128/256; latent decode x2; paged + merge
KERNELS = 3 * 2 * 2 * 2 + 2 + 2


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
    assert len(lines) == KERNELS, lines
    for line in lines:  # "<kernel>: ok <shared bytes> <limit>"
        verdict = line.rsplit(": ", 1)[1].split()
        assert verdict[0] == "ok" and int(verdict[1]) <= int(verdict[2]), line
