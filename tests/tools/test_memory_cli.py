"""`attnkit memory`: several models, variants, image tokens, plots, bad input."""

from __future__ import annotations

import json

import pytest

from attnkit.cli import main
from attnkit.tools.memory_plot import plot_contexts, plot_memory
from attnkit.tools.memory_report import memory_report
from attnkit.tools.presets import load_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_several_models_give_a_json_list_matching_the_functions(capsys):
    models = ["llama-3-8b", "mistral-7b", "deepseek-v3"]
    argv = ["memory", *models, "--context", "16384", "--batch", "2", "--gpu-memory", "2TB"]
    assert main([*argv, "--variant", "mqa", "--image-tokens", "100", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert isinstance(reports, list) and [r["model"] for r in reports] == [
        "Llama-3-8B",
        "Mistral-7B",
        "DeepSeek-V3",
    ]
    for model, report in zip(models, reports, strict=True):
        expected = memory_report(
            load_spec(model),
            context=16384,
            batch=2,
            gpu_bytes=2 * 10**12,
            image_tokens=100,
            variants=["mqa"],
        )
        assert report == json.loads(json.dumps(expected))
        assert [r["variant"] for r in report["what_if"]] == ["as shipped", "MQA (1 KV head)"]


def test_several_models_print_one_row_each_and_their_what_if_tables(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    argv = ["memory", "llama-3-8b", "mistral-7b", "gemma-2-9b", "--gpu-memory", "80GB"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("Llama-3-8B", "Mistral-7B", "Gemma-2-9B"):
        assert f"{name}: what if" in out
    assert "max reqs" in out and "max context" in out and "131,072" in out
    assert "Mistral-7B: 32 of 32 layers windowed (W = 4,096)" in out
    assert "Gemma-2-9B: 21 of 42 layers windowed (W = 4,096)" in out
    assert "Llama-3-8B: 0 of 32 layers windowed" in out
    assert "unbounded" in out  # Mistral: every layer windowed


def test_single_model_human_output_shows_image_tokens_and_variants(capsys):
    argv = ["memory", "llama-3-8b", "--image-tokens", "576", "--variant", "gqa:4"]
    assert main([*argv, "--variant", "window-alternating:4096"]) == 0
    out = capsys.readouterr().out
    assert "8,192 text + 576 image tokens" in out
    assert "GQA 4 KV heads" in out and "window 4096, every other layer" in out
    assert "MHA" not in out  # --variant restricts the table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variant", "gqa:x"], "expected one of: mha | mqa | gqa:KV_HEADS"),
        (["--variant", "kv:fp64"], "KV dtype must be one of"),
        (["--plot", "out.jpg"], "plot file must end in .png"),
    ],
)
def test_bad_cli_input_names_the_problem(capsys, argv, message):
    assert main(["memory", "llama-3-8b", *argv]) == 2
    assert message in capsys.readouterr().err


def test_negative_image_tokens_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["memory", "llama-3-8b", "--image-tokens", "-3"])
    assert "expected an integer >= 0, got -3" in capsys.readouterr().err


def test_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "kv.png"
    argv = ["memory", "llama-3-8b", "mistral-7b", "--variant", "window:4096", "--variant", "mqa"]
    assert main([*argv, "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert f"plot written to {path}" in capsys.readouterr().out.replace("\n", "")
    default = plot_memory([load_spec("gemma-2-9b")], tmp_path / "default.png")
    assert default.read_bytes()[:8] == PNG_MAGIC


def test_plot_contexts_span_1k_to_the_top_on_a_log_scale():
    contexts = plot_contexts()
    assert contexts[0] == 1024 and contexts[-1] == 128 * 1024
    assert contexts == sorted(set(contexts))
    assert plot_contexts(512)[-1] == 1024
