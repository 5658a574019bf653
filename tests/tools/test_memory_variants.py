"""tools.variants: `--variant` strings, the default what-if table, and per-layer figures."""

from __future__ import annotations

import pytest

from attnkit.tools.memory import kv_bytes, kv_bytes_per_token
from attnkit.tools.memory_report import memory_report, per_layer_bytes_per_token
from attnkit.tools.presets import load_spec
from attnkit.tools.variants import VARIANT_GRAMMAR, parse_variant, what_if_table, what_if_variants


def test_variants_parse():
    spec = load_spec("Llama-3-8B")  # 32 layers, 32 heads, 8 KV heads, head dim 128
    label, mha, dtype = parse_variant("mha", spec)
    assert (label, mha.kv_heads, dtype) == ("MHA (32 KV heads)", 32, "bf16")
    assert parse_variant("MQA", spec)[1].kv_heads == 1
    assert parse_variant("gqa:4", spec)[1].kv_heads == 4
    _, latent, _ = parse_variant("mla:512", spec)
    assert (latent.kv_rank, latent.rope_dim) == (512, 64)
    assert kv_bytes_per_token(latent) == 32 * (512 + 64) * 2
    _, window, _ = parse_variant("window:4096", spec)
    assert (window.window, window.window_layers) == (4096, None)
    _, alternating, _ = parse_variant("window-alternating:1024", spec)
    assert alternating.window == 1024 and alternating.window_layers == tuple(range(0, 32, 2))
    # 16 layers capped at 1024 + 16 global layers at 8192
    assert kv_bytes(alternating, 8192) == 4096 * (16 * 1024 + 16 * 8192)
    for dtype in ("fp8", "int8", "int4", "bf16", "fp16", "fp32"):
        assert parse_variant(f"kv:{dtype}", spec) == (f"KV {dtype}", spec, dtype)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gqa", "gqa needs a positive integer after ':', got ''"),
        ("gqa:0", "needs a positive integer"),
        ("mla:big", "got 'big'"),
        ("window:-5", "needs a positive integer"),
        ("kv:fp64", "KV dtype must be one of fp32, bf16, fp16, fp8, int8, int4, got 'fp64'"),
        ("mha:4", "mha takes no argument"),
        ("sparse:8", "unknown kind 'sparse'"),
        ("", "unknown kind ''"),
    ],
)
def test_bad_variants_list_the_grammar(text, message):
    with pytest.raises(ValueError) as error:
        parse_variant(text, load_spec("Llama-3-8B"))
    assert message in str(error.value)
    assert VARIANT_GRAMMAR in str(error.value)
    assert f"variant {text!r}" in str(error.value)


def test_gqa_heads_must_divide_the_query_heads():
    with pytest.raises(ValueError, match="gqa:5: KV heads must divide the 32 query heads"):
        parse_variant("gqa:5", load_spec("Llama-3-8B"))


def test_chosen_variants_restrict_the_table():
    spec = load_spec("Llama-3-8B")
    rows = what_if_table(spec, 8192, variants=["gqa:4", "kv:int4", "window-alternating:4096"])
    labels = [r["variant"] for r in rows]
    assert labels == ["as shipped", "GQA 4 KV heads", "KV int4", "window 4096, every other layer"]
    assert [r["saving"] for r in rows] == [1.0, 2.0, 4.0, 8192 * 32 / (16 * 4096 + 16 * 8192)]


def test_default_table_has_window_alternating_unless_shipped_so():
    llama = [label for label, _, _ in what_if_variants(load_spec("Llama-3-8B"))]
    assert "window 4096, every other layer" in llama
    gemma = [label for label, _, _ in what_if_variants(load_spec("Gemma-2-9B"))]
    assert "window 4096, every other layer" not in gemma  # that is Gemma 2 as shipped
    assert "window 4096, all layers" in gemma


def test_per_layer_breakdown_flags_windowed_layers():
    gemma = load_spec("Gemma-2-9B")
    layers = per_layer_bytes_per_token(gemma)
    assert len(layers) == 42
    assert [row["layer"] for row in layers if row["windowed"]] == list(range(0, 42, 2))
    assert sum(row["bytes_per_token"] for row in layers) == kv_bytes_per_token(gemma)
    assert all(row["windowed"] for row in per_layer_bytes_per_token(load_spec("Mistral-7B")))
    assert not any(row["windowed"] for row in per_layer_bytes_per_token(load_spec("GPT-2")))
    report = memory_report(gemma, context=8192)
    assert report["per_layer_bytes_per_token"] == layers and report["windowed_layers"] == 21


@pytest.mark.parametrize("name", ["Llama-3-8B", "DeepSeek-V3", "GPT-2"])
def test_image_tokens_add_exactly_n_tokens(name):
    spec = load_spec(name)
    plain = memory_report(spec, context=4096, batch=3, gpu_bytes=2 * 10**12)
    images = memory_report(spec, context=4096, batch=3, gpu_bytes=2 * 10**12, image_tokens=576)
    per_token = kv_bytes_per_token(spec)
    assert images["kv_bytes_per_request"] - plain["kv_bytes_per_request"] == 576 * per_token
    assert images["kv_bytes_batch"] - plain["kv_bytes_batch"] == 3 * 576 * per_token
    assert images["tokens_per_request"] == 4096 + 576 and images["image_tokens"] == 576
    assert plain["max_context"] > 576
    assert images["max_context"] == plain["max_context"] - 576  # text room beside the images
    assert images["max_batch"] <= plain["max_batch"]
    with pytest.raises(ValueError, match="image_tokens must be an integer >= 0, got -1"):
        memory_report(spec, context=10, image_tokens=-1)
