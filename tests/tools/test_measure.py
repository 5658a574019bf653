"""`peak_bytes` (tools/measure.py): what a profiled call writes to stderr passes on, but the
profiler's own noise."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from attnkit.tools.measure import PROFILER_NOISE, peak_bytes


def test_what_the_call_writes_to_stderr_passes_on_but_the_profilers_noise(capfd):
    def fn():  # Python's stderr (warnings go there too) and the file descriptor C++ logs to
        print("a line from the call", file=sys.stderr, flush=True)
        os.write(2, b"a native line from the call\n")
        os.write(2, f"[W] {PROFILER_NOISE}, profiler results will not ...\n".encode())
        return torch.ones(1000)

    assert peak_bytes(fn) >= 4000

    err = capfd.readouterr().err
    assert "a line from the call" in err and "a native line from the call" in err
    assert PROFILER_NOISE not in err


def test_an_error_in_the_call_raises_and_leaves_stderr_working(capfd):
    def fn():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        peak_bytes(fn)
    os.write(2, b"still here\n")
    assert "still here" in capfd.readouterr().err
