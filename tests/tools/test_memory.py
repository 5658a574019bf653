"""tools.memory: hand-computed examples, exact agreement with real caches, limits, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from attnkit.cache import ContiguousCache
from attnkit.cache.latent import LatentCache
from attnkit.cache.paged import PagedCache
from attnkit.cache.quantized import QuantizedCache
from attnkit.cache.window import SlidingWindowCache
from attnkit.cli import main
from attnkit.tools.cache_memory import (
    contiguous_cache_bytes,
    latent_cache_bytes,
    paged_cache_bytes,
    paged_pool_bytes,
    quantized_cache_bytes,
    window_cache_bytes,
)
from attnkit.tools.memory import (
    KVSpec,
    kv_bytes,
    kv_bytes_per_token,
    kv_bytes_per_token_layer,
    max_batch,
    max_context,
    weights_bytes,
)
from attnkit.tools.memory_report import memory_report, parse_size
from attnkit.tools.presets import PRESETS, load_spec, spec_from_gguf, spec_from_hf_config
from attnkit.tools.variants import what_if_table, what_if_variants


# -- worked examples, computed by hand ---------------------------------------------------------
def test_llama3_8b_bf16_is_131072_bytes_per_token():
    spec = load_spec("Llama-3-8B")
    # 32 layers x 8 KV heads x 128 dims x (K + V) x 2 bytes
    assert kv_bytes_per_token(spec, "bf16") == 32 * 8 * 128 * 2 * 2 == 131_072
    assert kv_bytes_per_token_layer(spec, "bf16") == 4096
    assert kv_bytes(spec, 8192, 4, "bf16") == 131_072 * 8192 * 4  # 4 GiB
    assert kv_bytes_per_token(spec, "int4") == 131_072 // 4
    assert weights_bytes(spec, "bf16") == 8_030_261_248 * 2


def test_gpt2_fp16_is_mha():
    # 12 layers x 12 heads x 64 dims x (K + V) x 2 bytes = 36,864 bytes per token
    assert kv_bytes_per_token(load_spec("gpt-2"), "fp16") == 36_864
    assert kv_bytes(load_spec("GPT-2"), 1024, 1, "fp32") == 36_864 * 2 * 1024


def test_sliding_window_layers_cap_at_w():
    mistral = load_spec("Mistral-7B")  # every layer windowed at 4096
    per_token = 32 * 8 * 128 * 2 * 2
    assert kv_bytes(mistral, 1000, 1, "bf16") == per_token * 1000
    assert kv_bytes(mistral, 4096, 1, "bf16") == per_token * 4096
    assert kv_bytes(mistral, 32768, 3, "bf16") == per_token * 4096 * 3
    gemma = load_spec("Gemma-2-9B")  # 21 windowed + 21 global layers, head dim 256
    per_layer = 8 * 256 * 2 * 2
    assert kv_bytes(gemma, 16384, 1, "bf16") == 21 * per_layer * (4096 + 16384)


def test_deepseek_v3_mla_counts_latent_plus_rope_key():
    spec = load_spec("DeepSeek-V3")
    assert kv_bytes_per_token(spec, "bf16") == 61 * (512 + 64) * 2 == 70_272
    assert kv_bytes_per_token(load_spec("DeepSeek-V2-Lite"), "bf16") == 27 * 576 * 2


def test_presets_are_many_and_valid():
    assert len(PRESETS) >= 15
    for key, spec in PRESETS.items():
        assert key == spec.name.lower()
        assert spec.params is not None and kv_bytes_per_token(spec) > 0
    assert load_spec("falcon-7b").kv_heads == 1


# -- exactness against attnkit's own caches -----------------------------------------------------
def random_spec(rng: random.Random) -> KVSpec:
    kv = rng.randint(1, 3)
    head_dim, v_dim = rng.randint(1, 6), rng.choice([None, rng.randint(1, 6)])
    return KVSpec(
        "tiny", layers=rng.randint(1, 3), heads=kv * rng.randint(1, 2), kv_heads=kv,
        head_dim=head_dim, v_head_dim=v_dim,
    )  # fmt: skip


def fill(cache, spec: KVSpec, seqs: int, tokens: int, step: int) -> list[int]:
    """Add `seqs` sequences and feed each `tokens` random K/V rows, `step` at a time."""
    ids = [cache.add_sequence() for _ in range(seqs)]
    done = 0
    while done < tokens:
        n = min(step, tokens - done)
        cache.prepare(ids, n)
        for layer in range(spec.layers):
            k = torch.randn(seqs, spec.kv_heads, n, spec.head_dim)
            v = torch.randn(seqs, spec.kv_heads, n, spec.v_head_dim or spec.head_dim)
            cache.update(layer, k, v)
        done += n
    return ids


def cache_args(spec: KVSpec) -> tuple[tuple[int, int, int], dict]:
    return (spec.layers, spec.kv_heads, spec.head_dim), {"v_head_dim": spec.v_head_dim}


@pytest.mark.parametrize("seed", range(8))
def test_contiguous_cache_nbytes_is_predicted(seed):
    rng = random.Random(seed)
    spec, seqs = random_spec(rng), rng.randint(1, 3)
    tokens, step, initial = rng.randint(1, 40), rng.randint(1, 12), rng.randint(1, 8)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    args, kwargs = cache_args(spec)
    grown = ContiguousCache(*args, max_seqs=seqs, initial_len=initial, dtype=dtype, **kwargs)
    fill(grown, spec, seqs, tokens, step)
    assert grown.nbytes == contiguous_cache_bytes(
        spec, max_seqs=seqs, initial_len=initial, tokens=tokens, step=step, dtype=dtype
    )
    fixed = ContiguousCache(*args, max_seqs=seqs, max_len=tokens, dtype=dtype, **kwargs)
    fill(fixed, spec, seqs, tokens, step)
    predicted = contiguous_cache_bytes(spec, max_seqs=seqs, max_len=tokens, dtype=dtype)
    assert fixed.nbytes == predicted
    # A cache sized exactly for the context holds what kv_bytes says, no more.
    assert predicted == kv_bytes(spec, tokens, seqs, dtype)


@pytest.mark.parametrize("seed", range(8))
def test_paged_cache_used_and_pool_bytes_are_predicted(seed):
    rng = random.Random(seed)
    spec, block = random_spec(rng), rng.randint(1, 8)
    lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 3))]
    args, kwargs = cache_args(spec)
    cache = PagedCache(*args, num_blocks=64, block_size=block, **kwargs)
    for n in lengths:
        fill(cache, spec, 1, n, rng.randint(1, 10))
    assert cache.used_nbytes == paged_cache_bytes(spec, lengths, block_size=block)
    assert cache.nbytes == paged_pool_bytes(spec, num_blocks=64, block_size=block)
    # Whole blocks: never less than the tokens need, less than one block more per sequence.
    exact = sum(kv_bytes(spec, n, 1, torch.float32) for n in lengths)
    assert exact <= cache.used_nbytes < exact + len(lengths) * kv_bytes(spec, block, 1, "fp32")


@pytest.mark.parametrize("seed", range(6))
def test_window_cache_nbytes_is_predicted(seed):
    rng = random.Random(seed)
    spec, window, sinks = random_spec(rng), rng.randint(1, 8), rng.randint(0, 3)
    seqs, max_new = rng.randint(1, 2), rng.randint(1, 5)
    args, kwargs = cache_args(spec)
    cache = SlidingWindowCache(
        *args, window=window, sinks=sinks, max_seqs=seqs, max_new_per_step=max_new, **kwargs
    )
    fill(cache, spec, seqs, rng.randint(1, 30), max_new)
    assert cache.nbytes == window_cache_bytes(
        spec, window=window, sinks=sinks, max_seqs=seqs, max_new_per_step=max_new
    )


def test_window_cache_with_one_token_steps_holds_exactly_w_tokens_plus_positions():
    spec = KVSpec("tiny", layers=2, heads=4, kv_heads=2, head_dim=3)
    cache = SlidingWindowCache(2, 2, 3, window=5, max_new_per_step=1)
    fill(cache, spec, 1, 20, 1)
    windowed = KVSpec("tiny", layers=2, heads=4, kv_heads=2, head_dim=3, window=5)
    assert cache.nbytes == kv_bytes(windowed, 20, 1, torch.float32) + 5 * 8


@pytest.mark.parametrize("seed", range(6))
def test_quantized_cache_nbytes_is_predicted(seed):
    rng = random.Random(seed)
    spec, seqs = random_spec(rng), rng.randint(1, 2)
    tokens, step, initial = rng.randint(1, 30), rng.randint(1, 8), rng.randint(1, 6)
    scale = rng.choice([torch.float32, torch.float16])
    args, kwargs = cache_args(spec)
    cache = QuantizedCache(*args, max_seqs=seqs, initial_len=initial, scale_dtype=scale, **kwargs)
    fill(cache, spec, seqs, tokens, step)
    assert cache.nbytes == quantized_cache_bytes(
        spec, max_seqs=seqs, initial_len=initial, tokens=tokens, step=step, scale_dtype=scale
    )


# -- limits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Llama-3-8B", "Gemma-2-9B", "DeepSeek-V2-Lite", "GPT-2"])
def test_max_batch_fits_exactly_and_one_more_does_not(name):
    spec, gpu, context = load_spec(name), 80 * 10**9, 8192
    free = gpu - weights_bytes(spec, "bf16")
    b = max_batch(spec, context, gpu, "bf16")
    assert b >= 1
    assert kv_bytes(spec, context, b, "bf16") <= free < kv_bytes(spec, context, b + 1, "bf16")
    n = max_context(spec, 4, gpu, "fp8")
    assert kv_bytes(spec, n, 4, "fp8") <= free < kv_bytes(spec, n + 1, 4, "fp8")


def test_limits_without_room_and_when_unbounded():
    llama = load_spec("llama-3.1-405b")  # 810 GB of bf16 weights
    assert max_batch(llama, 1024, 80 * 10**9) == 0
    assert max_context(llama, 1, 80 * 10**9) == 0
    mistral = load_spec("mistral-7b")  # every layer windowed: the cache stops growing
    assert max_context(mistral, 1, 80 * 10**9) is None
    assert max_context(mistral, 10_000, 80 * 10**9) < 4096


# -- what-if variants ---------------------------------------------------------------------------
def test_what_if_variants_and_savings():
    spec = load_spec("Llama-3-8B")
    rows = {r["variant"]: r for r in what_if_table(spec, 8192)}
    assert rows["as shipped"]["saving"] == 1.0
    assert rows["MHA (32 KV heads)"]["saving"] == 0.25
    assert rows["MQA (1 KV head)"]["saving"] == 8.0
    assert rows["GQA 4 KV heads"]["saving"] == 2.0
    assert "GQA 8 KV heads" not in rows  # that is the model as shipped
    assert rows["MLA rank 512 + RoPE 64"]["kv_bytes_per_token"] == 32 * 576 * 2
    assert rows["window 4096, all layers"]["saving"] == 2.0  # 8192 tokens capped at 4096
    assert rows["KV int4"]["saving"] == 4.0
    mistral = [label for label, _, _ in what_if_variants(load_spec("Mistral-7B"))]
    assert "window 4096, all layers" not in mistral  # already so as shipped
    labels = [label for label, _, _ in what_if_variants(load_spec("DeepSeek-V3"))]
    assert "GQA 8 KV heads" in labels  # MLA's own kv_heads is not a GQA layout


# -- bad inputs ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": 0}, "layers must be an integer >= 1, got 0"),
        ({"kv_heads": 3}, "multiple of kv_heads=3"),
        ({"window_layers": (0,)}, "window is None"),
        ({"window": 8, "window_layers": (5,)}, "window_layers must be distinct"),
        ({"kv_rank": 8}, "MLA needs both kv_rank and rope_dim"),
        ({"head_dim": 2.5}, "head_dim must be an integer"),
    ],
)
def test_bad_specs_name_the_field(kwargs, message):
    base = {"layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8}
    with pytest.raises(ValueError, match=message):
        KVSpec("bad", **{**base, **kwargs})


def test_bad_arguments_name_the_problem():
    spec = load_spec("gpt-2")
    with pytest.raises(ValueError, match="dtype must be one of"):
        kv_bytes(spec, 10, 1, "fp64")
    with pytest.raises(ValueError, match="context must be an integer >= 0"):
        kv_bytes(spec, -1)
    with pytest.raises(ValueError, match="params is None"):
        weights_bytes(KVSpec("x", layers=1, heads=1, kv_heads=1, head_dim=1))
    with pytest.raises(ValueError, match="MLA latents"):
        contiguous_cache_bytes(load_spec("deepseek-v3"))
    with pytest.raises(ValueError, match="neither a preset"):
        load_spec("no-such-model")
    with pytest.raises(ValueError, match="80GB"):
        parse_size("lots")
    assert parse_size("80GB") == 80 * 10**9 and parse_size("24GiB") == 24 * 2**30


# -- reading configs ---------------------------------------------------------------------------
LLAMA3_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}


def test_hf_config_files_and_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_CONFIG))
    for model in (tmp_path, tmp_path / "config.json"):
        assert kv_bytes_per_token(load_spec(str(model))) == 131_072
    assert load_spec(str(tmp_path)).params is None  # no weights beside the config
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5)}, str(tmp_path / "model.safetensors"))
    assert load_spec(str(tmp_path)).params == 17
    gpt2 = spec_from_hf_config({"n_layer": 12, "n_head": 12, "n_embd": 768})
    assert kv_bytes_per_token(gpt2, "fp16") == 36_864
    falcon = spec_from_hf_config({"num_hidden_layers": 32, "num_attention_heads": 71,
                                  "hidden_size": 4544, "multi_query": True})  # fmt: skip
    assert (falcon.kv_heads, falcon.head_dim) == (1, 64)


def test_hf_config_windows_and_mla():
    gemma = {**LLAMA3_CONFIG, "model_type": "gemma2", "num_hidden_layers": 4, "head_dim": 256,
             "sliding_window": 4096}  # fmt: skip
    assert spec_from_hf_config(gemma).window_layers == (0, 2)
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert spec_from_hf_config({**gemma, "layer_types": types}).window_layers == (1, 2)
    qwen = {**LLAMA3_CONFIG, "sliding_window": 4096, "use_sliding_window": False}
    assert spec_from_hf_config(qwen).window is None
    mistral = spec_from_hf_config({**LLAMA3_CONFIG, "sliding_window": 4096})
    assert (mistral.window, mistral.window_layers) == (4096, None)
    v3 = {"num_hidden_layers": 61, "num_attention_heads": 128, "kv_lora_rank": 512,
          "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128}  # fmt: skip
    assert kv_bytes_per_token(spec_from_hf_config(v3)) == 70_272
    with pytest.raises(ValueError, match="num_attention_heads / n_head"):
        spec_from_hf_config({"num_hidden_layers": 2})
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        spec_from_hf_config({**LLAMA3_CONFIG, "kv_lora_rank": 512})


def test_gguf_metadata(tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(32)
    writer.add_embedding_length(4096)
    writer.add_head_count(32)
    writer.add_head_count_kv(8)
    writer.add_tensor("token_embd.weight", np.zeros((10, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec = load_spec(str(path))
    assert spec == spec_from_gguf(path)
    assert kv_bytes_per_token(spec) == 131_072 and spec.params == 40

    broken = tmp_path / "broken.gguf"
    writer = GGUFWriter(str(broken), "llama")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="lacks 'llama.attention.head_count'"):
        load_spec(str(broken))


# -- the command ---------------------------------------------------------------------------------
def test_cli_json_matches_the_functions(capsys):
    argv = ["memory", "Llama-3-8B", "--context", "4096", "--batch", "3", "--gpu-memory", "80GB"]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    spec = load_spec("Llama-3-8B")
    assert report["kv_bytes_per_token"] == 131_072
    assert report["kv_bytes_batch"] == kv_bytes(spec, 4096, 3)
    assert report["max_batch"] == max_batch(spec, 4096, 80 * 10**9)
    assert report["max_context"] == max_context(spec, 3, 80 * 10**9)
    expected = memory_report(spec, context=4096, batch=3, gpu_bytes=80 * 10**9)
    assert report == json.loads(json.dumps(expected))
    assert main(argv) == 0
    assert "131,072" in capsys.readouterr().out


def test_cli_reports_bad_models(capsys):
    assert main(["memory", "no-such-model"]) == 2
    assert "neither a preset" in capsys.readouterr().err


# -- MLA: the latent cache -----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_latent_cache_nbytes_is_predicted(seed):
    rng = random.Random(seed)
    layers, kv_rank, rope_dim = rng.randint(1, 3), rng.randint(1, 9), 2 * rng.randint(1, 3)
    rope_heads, seqs = rng.choice([1, 3]), rng.randint(1, 3)
    tokens, step, initial = rng.randint(1, 40), rng.randint(1, 12), rng.randint(1, 8)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    spec = KVSpec(
        "mla", layers=layers, heads=3, kv_heads=3, head_dim=8,
        kv_rank=kv_rank, rope_dim=rope_heads * rope_dim,
    )  # fmt: skip
    for max_len in (None, tokens):
        cache = LatentCache(
            layers, kv_rank, rope_dim, rope_heads=rope_heads, max_seqs=seqs,
            max_len=max_len, initial_len=initial, dtype=dtype,
        )  # fmt: skip
        ids, done = [cache.add_sequence() for _ in range(seqs)], 0
        while done < tokens:
            n = min(step, tokens - done)
            cache.prepare(ids, n)
            for layer in range(layers):
                latent = torch.randn(seqs, n, kv_rank).to(dtype)
                cache.update(layer, latent, torch.randn(seqs, rope_heads, n, rope_dim).to(dtype))
            done += n
        predicted = latent_cache_bytes(
            spec, max_seqs=seqs, max_len=max_len, initial_len=initial, tokens=tokens,
            step=step, dtype=dtype,
        )  # fmt: skip
        assert cache.nbytes == predicted
    # Sized exactly for the context, it holds what kv_bytes says for MLA, no more.
    assert predicted == kv_bytes(spec, tokens, seqs, dtype)


def test_latent_cache_bytes_needs_an_mla_spec():
    with pytest.raises(ValueError, match="latent_cache_bytes needs an MLA spec"):
        latent_cache_bytes(load_spec("Llama-3-8B"))


@pytest.mark.parametrize("budget, max_new", [(8, 4), (5, 1)])
@torch.no_grad()
def test_h2o_prediction_equals_the_real_cache(budget, max_new):
    from attnkit.cache import H2OCache
    from attnkit.tools.cache_memory import h2o_cache_bytes

    spec = KVSpec("tiny", layers=2, heads=6, kv_heads=3, head_dim=7)
    for dtype in (torch.float32, torch.float16):
        cache = H2OCache(2, 3, 7, budget=budget, recent=2, max_new_per_step=max_new, dtype=dtype)
        assert cache.nbytes == h2o_cache_bytes(
            spec, budget=budget, max_new_per_step=max_new, dtype=dtype
        )
