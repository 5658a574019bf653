"""The `attnkit` command: version, help, the demo's numbers, and bad arguments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import attnkit
from attnkit.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnkit {attnkit.__version__}"


def test_help_lists_the_commands(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run(
        [sys.executable, "-m", "attnkit.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: attnkit" in result.stdout


def test_demo_json_reports_every_backend_with_small_errors(capsys):
    assert main(["demo", "--seq-len", "64", "--window", "16", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["mask"] for r in rows} == {"causal", "window 16+sinks"}
    assert {r["backend"].split()[0] for r in rows} == {"auto", "sdpa", "tiled", "reference"}
    for row in rows:
        assert row["max_abs_error"] < 1e-5  # float32 against the float64 reference
        assert row["milliseconds"] > 0 and row["peak_mib"] >= 0
    assert all(r["speed_vs_sdpa"] == 1.0 for r in rows if r["backend"] == "sdpa")


@pytest.mark.parametrize("force_color", [False, True], ids=["pipe", "pipe forcing colour"])
def test_tables_printed_into_a_pipe_keep_their_headers_whole(force_color):
    """rich falls back to 80 columns where stdout is not a terminal (and CI logs that force
    colour pass for one), which cut the tables' headers to an ellipsis in logs and files."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR")}
    out = subprocess.run(
        [sys.executable, "-m", "attnkit.cli", "memory", "smollm2-135m", "--context", "4096"],
        capture_output=True,
        text=True,
        check=True,
        env=env | ({"FORCE_COLOR": "1"} if force_color else {}),
    ).stdout
    out = re.sub(r"\x1b\[[0-9;]*m", "", out)  # forced colour's escape codes
    assert "KV bytes per token, all layers (uncapped)" in out
    assert "┃ variant" in out and "…" not in out


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_demo_rejects_a_bad_length(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--seq-len", value])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def test_generate_streams_an_answer_and_reports_tokens_per_second(capsys):
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "20"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "decode" in captured.err and "tokens/s" in captured.err
