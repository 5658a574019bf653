"""`attnkit bench`: rows, settings, the suite's plan, and a quick run through the CLI.

Timings are not asserted here (performance lives in the benchmark's own output); these
tests check that every row is a ratio of two real measurements, that goals are judged
the way the table says, and that the command runs and reports every target.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from attnkit.cli import main
from attnkit.ops.cpp_build import load_kernel, unavailable_reason
from attnkit.tools.bench import TARGETS, BenchSettings, Machine, Row, plan
from attnkit.tools.bench.core import Timer, causal_flops

MACHINE = Machine(
    copy_bytes_per_s=30e9, matmul_flops_per_s=1.5e11, peak_flops_per_s=2e11, description="test"
)


def test_speed_is_baseline_over_attnkit_and_goal_is_a_minimum_speed():
    row = Row(3, "decode", attnkit_s=0.012, baseline="memory floor", baseline_s=0.008, goal=1 / 1.5)
    assert row.speed == pytest.approx(0.008 / 0.012)
    assert row.met is True  # 1.5x the floor's time is exactly the limit
    assert row.goal_text == "<= 1.5x its time"
    slow = Row(1, "prefill", attnkit_s=1.0, baseline="enable_gqa", baseline_s=1.2, goal=1.5)
    assert slow.met is False and slow.goal_text == ">= 1.5x faster"
    info = Row(1, "prefill", attnkit_s=1.0, baseline="compute floor", baseline_s=0.6, goal=None)
    assert info.met is None and info.goal_text == "—"


def test_a_baseline_that_could_not_run_is_not_judged():
    row = Row(6, "generate", 1.0, "transformers generate", math.nan, 2.0, "needs accelerate")
    assert math.isnan(row.speed) and row.met is None
    assert row.as_dict()["note"] == "needs accelerate"


def test_the_copy_floor_is_sized_past_the_largest_cache_linux_reports(tmp_path):
    # A copy that fits the last-level cache measures the cache, not memory (a 480 MiB L3).
    from attnkit.tools.bench.core import last_level_cache_bytes

    for index, size in enumerate(["48K", "2048K", "491520K", "1G", "garbage"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 2**30
    (tmp_path / "index3" / "size").write_text("3M\n")
    assert last_level_cache_bytes(tmp_path) == 480 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == 0


def test_the_fma_chains_report_the_flops_they_did():
    # 12 chains of one vector FMA per iteration on every thread: 2 FLOPs per lane, and a
    # lane count a machine's registers have (SSE/NEON 4, AVX2 8, AVX-512 16)
    module = load_kernel("fma_peak.cpp")
    assert module is not None, unavailable_reason("fma_peak.cpp")
    flops = module.fma_flops(1000)
    lanes = flops / (2 * 12 * 1000 * torch.get_num_threads())
    assert lanes in (4, 8, 16)
    assert module.fma_flops(3000) == 3 * flops
    # the chains really run: 2^20 rounds take milliseconds, under 1 TFLOP/s a thread (a
    # loop the compiler dropped would take microseconds: petaflops)
    start = time.perf_counter()
    flops = module.fma_flops(2**20)
    seconds = time.perf_counter() - start
    assert flops / seconds < 1e12 * torch.get_num_threads(), (flops, seconds)
    with pytest.raises(RuntimeError, match="iterations >= 1, got 0"):
        module.fma_flops(0)


def test_the_compute_floor_falls_back_to_the_matmul_rate_without_the_kernel(monkeypatch):
    from attnkit.tools.bench import core

    monkeypatch.setattr(core, "load_kernel", lambda source: None)
    monkeypatch.setattr(core, "unavailable_reason", lambda source: "no compiler")
    monkeypatch.setattr(Machine, "copy_rate", staticmethod(lambda timer: 1e9))
    machine = Machine.measure(Timer(1))
    assert machine.peak_flops_per_s is None
    assert machine.floor_flops_per_s == machine.matmul_flops_per_s > 0
    assert machine.peak_name == "matmul rate (FMA peak unmeasured)"
    assert "FMA peak unmeasured (no compiler)" in machine.description
    assert machine.peak_floor(1e9) == 1e9 / machine.matmul_flops_per_s


def test_the_peak_is_the_best_call_not_a_median(monkeypatch):
    # A 2-vCPU VM ran the first quarter second of FMA chains at one core's rate
    from attnkit.tools.bench import core

    class Chains:
        def __init__(self):
            self.calls = 0

        def fma_flops(self, iterations):
            self.calls += 1
            return 1e9 * (2 if self.calls == 3 else 1)

    ticks = iter(range(100))
    monkeypatch.setattr(core, "load_kernel", lambda source: Chains())
    monkeypatch.setattr(core.time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setattr(Machine, "PEAK_SECONDS", 5)  # each call "takes" 1 s: 5 calls
    assert Machine.peak_rate() == 2e9


def test_causal_flops_count_the_kept_pairs():
    # n = 2: pairs (0,0), (1,0), (1,1); two matmuls of 2·d flops per pair and head
    assert causal_flops(2, heads=3, d=4) == 3 * 3 * 2 * 2 * 4


def test_the_prefill_floor_counts_every_token_through_the_blocks_and_one_through_the_head():
    from attn_testing import tiny_transformer
    from attnkit.tools.bench.endtoend import _prefill_floor

    model = tiny_transformer(0)
    c = model.config
    attn = 2 * c.hidden_size**2 + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
    per_layer = attn + 3 * c.hidden_size * c.intermediate_size
    body, head = c.num_hidden_layers * per_layer, c.vocab_size * c.hidden_size
    prompts = [[1] * 5, [2] * 7]
    flops = 2 * (body * 12 + head * 2)
    assert math.isclose(_prefill_floor(model, prompts, MACHINE), flops / 2e11, rel_tol=1e-12)


def test_the_8k_prefill_rows_time_its_own_matmuls_and_count_every_flop(monkeypatch):
    # the target's floor adds attention at the peak to the model's matmuls as it runs them;
    # the all-at-peak row counts every block's linears at n rows and the head at one
    from attn_testing import tiny_transformer
    from attnkit.tools.bench import endtoend

    model = tiny_transformer(0).float()
    monkeypatch.setattr(endtoend, "smollm2", lambda: (model, None))
    settings = BenchSettings(quick=True, repeats=1)
    [case] = endtoend.prefill_cases(settings, MACHINE)
    floor, at_peak, torch_row = case.run(Timer(1))
    c, n = model.config, 1024
    attn = 2 * c.hidden_size**2 + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim
    body = c.num_hidden_layers * (attn + 3 * c.hidden_size * c.intermediate_size)
    attention = c.num_hidden_layers * causal_flops(n, c.num_attention_heads, c.head_dim)
    flops = 2 * (body * n + c.vocab_size * c.hidden_size) + attention
    assert math.isclose(at_peak.baseline_s, flops / 2e11, rel_tol=1e-12)
    assert floor.goal == 1 / 1.3 and at_peak.goal is None and torch_row.goal is None
    # its matmuls took some time: the floor is more than the attention FLOPs alone
    assert floor.baseline_s > attention / 2e11
    assert floor.attnkit_s == at_peak.attnkit_s == torch_row.attnkit_s > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": (7,)}, "targets must be a non-empty subset"),
        ({"targets": ()}, "targets must be a non-empty subset"),
        ({"repeats": 0}, "repeats must be an integer >= 1, got 0"),
        ({"repeats": 2.5}, "repeats must be an integer >= 1, got 2.5"),
    ],
)
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchSettings(**kwargs)


def test_full_plan_covers_every_target_and_the_issue_sizes():
    cases = plan(BenchSettings(), MACHINE)
    assert {c.target for c in cases} == set(TARGETS)
    names = [c.name for c in cases]
    # prefill at 4k and 16k for GQA and MQA; decode over batch 1..32 x context 1k..16k
    assert {"prefill N=4096 kv=2", "prefill N=16384 kv=1"} <= set(names)
    decode = [n for n in names if n.startswith("decode")]
    assert len(decode) == 9 and "decode b=32 ctx=16384" in decode
    assert "window N=16384 + sinks" in names and "MLA decode ctx=4096" in names
    quick = plan(BenchSettings(quick=True, targets=(3,)), MACHINE)
    assert [c.name for c in quick] == [
        "decode b=1 ctx=1024",
        "decode b=1 ctx=4096",
        "decode b=8 ctx=1024",
        "decode b=8 ctx=4096",
    ]


def test_cli_rejects_unknown_targets(capsys):
    assert main(["bench", "--targets", "2,9"]) == 2
    assert "--targets must be comma-separated numbers from [1, 2, 3, 4, 5, 6]" in (
        capsys.readouterr().err
    )


@pytest.mark.slow
def test_quick_run_of_the_kernel_targets_reports_measured_ratios(capsys):
    assert main(["bench", "--quick", "--targets", "3,4,5", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = result["rows"]
    assert {r["target"] for r in rows} == {3, 4, 5}
    assert result["copy_GBps"] > 0 and result["matmul_GFLOPps"] > 0
    for r in rows:
        assert r["attnkit_s"] > 0 and r["baseline_s"] > 0, r
        assert r["speed"] == pytest.approx(r["baseline_s"] / r["attnkit_s"])
        judged = r["goal"] is not None  # context rows (a second baseline) carry no goal
        assert r["met"] == (r["speed"] >= r["goal"] if judged else None)
    assert {r["baseline"] for r in rows if r["target"] == 5 and r["goal"] is None} == {
        "softmax causal attention (attnkit auto)"
    }
    decode = [r for r in rows if r["target"] == 3]
    # 4 problems x (contiguous vs floor and vs a plain read, the read vs floor, paged vs floor
    # and vs contiguous)
    assert len(decode) == 4 * 5
    assert sum(r["baseline"] == "torch sum of the K/V (a plain read)" for r in decode) == 4
    (mla,) = [r for r in rows if r["target"] == 4]
    assert "cache 2304 B/token/layer" in mla["note"]  # (512 + 64) x float32, as the formula


@pytest.mark.slow
def test_table_output_names_every_column(capsys):
    assert main(["bench", "--quick", "--targets", "4", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for column in ("attnkit ms", "baseline ms", "speed", "goal", "met", "MLA naive mode"):
        assert column in out
    assert "[1] cache 2304 B/token/layer" in out


@pytest.mark.slow
def test_markdown_output_is_a_table_with_footnotes(capsys):
    assert main(["bench", "--quick", "--targets", "4", "--repeats", "1", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| # | case | attnkit ms | baseline | baseline ms | speed | goal | met |" in out
    assert "| 4 | MLA decode (DeepSeek-V2-Lite dims), batch 1, context 1024 [1] |" in out
    assert "[1] cache 2304 B/token/layer" in out


def test_pair_and_in_turn_time_the_calls_in_turn_after_one_warm_up_each():
    from attnkit.tools.bench.core import Timer

    calls = []
    slow = lambda name: lambda: (calls.append(name), time.sleep(0.06))  # noqa: E731
    ours, theirs = Timer(3).pair(slow("a"), slow("b"))
    assert calls == ["a", "b"] * 4  # a warm-up each, then three alternating rounds
    assert 0.06 <= ours < 1 and 0.06 <= theirs < 1
    calls.clear()
    times = Timer(3).in_turn(slow("a"), slow("b"), slow("c"))
    assert calls == ["a", "b", "c"] * 4 and len(times) == 3
    assert all(0.06 <= t < 1 for t in times)


def test_in_turn_runs_before_ahead_of_every_call_untimed():
    from attnkit.tools.bench.core import Timer

    calls = []
    slow = lambda name, s: lambda: (calls.append(name), time.sleep(s))  # noqa: E731
    times = Timer(3).in_turn(slow("a", 0.06), slow("b", 0.06), before=slow("x", 0.2))
    assert calls == ["x", "a", "x", "b"] * 4
    assert all(0.06 <= t < 0.2 for t in times)  # the 0.2 s before each call is not counted


def test_the_cache_evictor_reads_four_times_the_last_level_cache():
    from attnkit.tools.bench.core import CacheEvictor, last_level_cache_bytes

    evict = CacheEvictor()
    assert evict.buffer.nbytes >= max(128 * 2**20, 4 * last_level_cache_bytes())
    n = evict.buffer.numel()
    assert abs(evict() - n) <= 1e-6 * n  # a sum of ones: every element was read


def test_calls_too_quick_to_time_once_get_more_repeats_up_to_a_cap():
    from attnkit.tools.bench.core import Timer

    calls = []
    Timer(3)(lambda: calls.append(1))  # microseconds: the cap
    assert len(calls) == 1 + Timer.MAX_REPEATS
    calls.clear()
    Timer(3)(lambda: (calls.append(1), time.sleep(0.01)))  # ~10 ms: ~0.1 s of calls
    assert 1 + 3 < len(calls) <= 1 + 11
    calls.clear()
    Timer(3)(lambda: (calls.append(1), time.sleep(0.06)))  # slow enough: as asked
    assert len(calls) == 1 + 3
    calls.clear()
    # A first call that builds something (slow) must not leave a quick call with the
    # base repeats: they follow the fastest call so far.
    Timer(3)(lambda: (calls.append(1), time.sleep(0.2 if len(calls) == 1 else 0)))
    assert len(calls) == 1 + Timer.MAX_REPEATS


def test_llama_cpp_failures_come_back_as_a_reason_not_a_crash(tmp_path):
    # llama.cpp runs in a child process: a missing package, a bad model file or a native
    # crash (a build for CPU features the host lacks) ends the child, and the row says why.
    from attnkit.tools.bench.llama_cpp_run import time_generation

    result = time_generation(str(tmp_path / "missing.gguf"), "hello", 1, 2, 1)
    assert isinstance(result, str) and result.startswith("llama.cpp exited with code")
