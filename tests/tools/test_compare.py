"""`attnkit compare`: strategy names, the report's pieces, and the quick run's honesty checks.

The quick run (the CI smoke test of the main job) runs once per session through the CLI;
the checks below read its results.json. They are the literature's claims, measured:
MHA expansion changes nothing, mean-pooling to MQA does not help, attention sinks keep a
window close to full attention while a bare window falls behind, full attention finds a
passkey within the training length, and every real cache allocation equals attnkit
memory's prediction.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest

from attnkit.cli import main
from attnkit.tools.compare import GRAMMAR, CompareSettings, StrategyResult, parse
from attnkit.tools.compare.plots import pareto_front, write_plots
from attnkit.tools.compare.report import markdown, results_json, table_rows

# -- strategy names -------------------------------------------------------------------------

NAMES = {
    "shipped": "as shipped",
    "mha": "more KV heads",
    "mqa": "fewer KV heads",
    "gqa:1": "fewer KV heads",
    "mla:64": "MLA",
    "window:256": "window",
    "sinks:256": "window + sinks",
    "h2o:128": "eviction",
    "int8": "quantized",
    "rope:yarn": "context extension",
}


@pytest.mark.parametrize("name", NAMES)
def test_every_documented_name_parses(name):
    strategy = parse(name)
    assert (strategy.name, strategy.family) == (name, NAMES[name])
    assert strategy.extends_context == name.startswith("rope:")


@pytest.mark.parametrize("name", ["window", "window:0", "mla:x", "rope:ntk2", "fast", "int8:2"])
def test_unknown_names_list_the_grammar(name):
    with pytest.raises(ValueError, match=f"unknown strategy {name!r}; allowed: "):
        parse(name)
    assert "window:W" in GRAMMAR


def test_sinks_must_keep_more_than_the_sinks():
    with pytest.raises(ValueError, match="sinks:4 must keep more than the 4 sink tokens"):
        parse("sinks:4")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategies", "shipped,windw:8"], "unknown strategy 'windw:8'"),
        (["--contexts", "512,x"], "--contexts must be positive integers, got '512,x'"),
        (["--contexts", "0"], "--contexts must be positive integers"),
        (
            ["--contexts", "512,1000"],
            "contexts must be multiples of the cache step (256 tokens), got 1000",
        ),
        (["--quick", "--contexts", "64"], "multiples of the cache step (128 tokens), got 64"),
    ],
)
def test_bad_flags_fail_before_any_work(tmp_path, capsys, argv, message):
    assert main(["compare", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


# -- the report's pieces, on made-up rows ---------------------------------------------------


def made_up(name, label, family, per_token, ppl):
    row = StrategyResult(name, label, family, contexts=[100])
    row.kv_bytes = row.predicted_kv_bytes = {100: per_token * 100}
    row.perplexity, row.scored_tokens = {100: ppl}, {100: 99}
    row.position_perplexity = {"position": [25.0, 75.0], "perplexity": [ppl + 1, ppl]}
    row.passkey = {"lengths": [64], "depths": [0.5], "accuracy": [[1.0]], "overall": 1.0}
    row.prefill_seconds, row.decode_tokens_per_second = 0.5, 20.0
    return row


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [(4, 10), (2, 12), (1, 30), (3, 12), (8, 9), (8, 11)]
    assert pareto_front(points) == [2, 1, 0, 4]


def test_table_markdown_and_plots_from_rows(tmp_path):
    rows = [
        made_up("shipped", "as shipped", "as shipped", 1000, 10.0),
        made_up("window:8", "window 8", "window", 250, 14.0),
    ]
    cells = table_rows(rows)
    assert cells[0][1:4] == ["1000 B", "1.00x", "10.00"]
    assert cells[1][1:4] == ["250 B", "4.00x", "14.00"]
    meta = {
        "settings": asdict(CompareSettings.quick(strategies=("shipped", "window:8"))),
        "machine": {"cpu_count": 2},
        "dtype": "float32",
        "seconds": 60.0,
    }
    plots = write_plots(rows, [100], tmp_path)
    assert sorted(p.name for p in plots) == ["pareto.png", "passkey.png", "streaming.png"]
    assert all(p.stat().st_size > 10_000 for p in plots)  # real figures, not empty files
    text = markdown(rows, meta, [str(p) for p in plots])
    assert "| window 8 | 250 B | 4.00x | 14.00 | 100% |" in text
    assert "![pareto](pareto.png)" in text
    assert "RoPE rows" not in text  # no rope:* strategy, no extension length to mention
    assert results_json(rows, meta)["strategies"][1]["kv_bytes_per_token"] == 250


# -- the quick run: the main job end to end, and what it must find ---------------------------

FIELDS = {
    "name",
    "label",
    "family",
    "contexts",
    "kv_bytes",
    "predicted_kv_bytes",
    "kv_bytes_per_token",
    "memory_check",
    "perplexity",
    "scored_tokens",
    "position_perplexity",
    "passkey",
    "prefill_seconds",
    "decode_tokens_per_second",
    "build_seconds",
    "seconds",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["compare", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_the_report_with_every_field(quick):
    out, results = quick
    settings = CompareSettings.quick()
    assert [r["name"] for r in results["strategies"]] == list(settings.strategies)
    for row in results["strategies"]:
        assert set(row) >= FIELDS, FIELDS - set(row)
        assert [int(c) for c in row["perplexity"]] == list(settings.contexts)
        assert all(math.isfinite(p) and p > 1 for p in row["perplexity"].values())
        assert row["decode_tokens_per_second"] > 0 and row["prefill_seconds"] > 0
        assert row["memory_check"], (row["name"], row["kv_bytes"], row["predicted_kv_bytes"])
        # every target after a segment's first token is scored, exactly once
        assert row["scored_tokens"] == {
            str(c): settings.segments * (c - 1) for c in settings.contexts
        }
    for name in ("report.md", "pareto.png", "streaming.png", "passkey.png"):
        assert (out / name).stat().st_size > 1000
    assert results["settings"]["seed"] == 0 and results["machine"]["cpu_count"] >= 1


def by_name(results) -> dict:
    return {r["name"]: r for r in results["strategies"]}


@pytest.mark.slow
def test_quick_run_honesty_checks(quick):
    rows, longest = by_name(quick[1]), str(max(CompareSettings.quick().contexts))
    ppl = {name: row["perplexity"][longest] for name, row in rows.items()}
    # MHA expansion repeats K/V heads: the same model, 3x the memory.
    assert math.isclose(ppl["mha"], ppl["shipped"], rel_tol=1e-4)
    assert rows["mha"]["kv_bytes_per_token"] == 3 * rows["shipped"]["kv_bytes_per_token"]
    # Mean-pooled MQA without uptraining does not improve on the shipped model.
    assert ppl["mqa"] > ppl["shipped"]
    # StreamingLLM: once the stream passes the window, dropping the first tokens hurts and
    # keeping 4 of them as sinks wins most of it back. Measured at window 128 on 512 tokens:
    # full 11.57, window 21.09, sinks 13.21 (14% above full, not "a few percent": the
    # window is small; the full run's 1024 window is closer, see README).
    full, window, sinks = ppl["shipped"], ppl["window:128"], ppl["sinks:128"]
    assert window > 1.5 * full
    assert (window - sinks) / (window - full) > 0.75  # sinks recover most of the gap
    assert sinks < 1.2 * full
    # Full attention retrieves a passkey within the training length.
    assert rows["shipped"]["passkey"]["overall"] >= 0.99
