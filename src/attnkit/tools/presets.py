"""Attention configs of well-known models, and reading one from a name, config.json or GGUF.

Preset values are the published ones: each names its source. Parameter counts for the
dense models are exact (they also follow from the config: embeddings + layers, checked by
hand); the DeepSeek ones are the nominal totals from their model cards.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from attnkit.tools.memory import KVSpec


def _preset(*specs: KVSpec) -> dict[str, KVSpec]:
    return {spec.name.lower(): spec for spec in specs}


PRESETS: dict[str, KVSpec] = _preset(
    # huggingface.co/meta-llama/Llama-2-7b-hf config.json
    KVSpec("Llama-2-7B", layers=32, heads=32, kv_heads=32, head_dim=128, params=6_738_415_616),
    # huggingface.co/meta-llama/Llama-2-70b-hf config.json
    KVSpec("Llama-2-70B", layers=80, heads=64, kv_heads=8, head_dim=128, params=68_976_648_192),
    # huggingface.co/meta-llama/Meta-Llama-3-8B config.json
    KVSpec("Llama-3-8B", layers=32, heads=32, kv_heads=8, head_dim=128, params=8_030_261_248),
    # huggingface.co/meta-llama/Llama-3.1-70B config.json
    KVSpec("Llama-3.1-70B", layers=80, heads=64, kv_heads=8, head_dim=128, params=70_553_706_496),
    # huggingface.co/meta-llama/Llama-3.1-405B config.json
    KVSpec(
        "Llama-3.1-405B", layers=126, heads=128, kv_heads=8, head_dim=128, params=405_853_388_800
    ),
    # huggingface.co/mistralai/Mistral-7B-v0.1 config.json (sliding_window 4096, every layer)
    KVSpec(
        "Mistral-7B",
        layers=32,
        heads=32,
        kv_heads=8,
        head_dim=128,
        window=4096,
        params=7_241_732_096,
    ),
    # huggingface.co/mistralai/Mixtral-8x7B-v0.1 config.json (sliding_window null)
    KVSpec("Mixtral-8x7B", layers=32, heads=32, kv_heads=8, head_dim=128, params=46_702_792_704),
    # huggingface.co/Qwen/Qwen2.5-7B config.json (use_sliding_window false)
    KVSpec("Qwen2.5-7B", layers=28, heads=28, kv_heads=4, head_dim=128, params=7_615_616_512),
    # huggingface.co/Qwen/Qwen2.5-72B config.json (use_sliding_window false)
    KVSpec("Qwen2.5-72B", layers=80, heads=64, kv_heads=8, head_dim=128, params=72_706_203_648),
    # huggingface.co/google/gemma-2-9b config.json: sliding_window 4096 on even layers
    # (transformers' Gemma2 layer_types), global attention on odd ones
    KVSpec(
        "Gemma-2-9B",
        layers=42,
        heads=16,
        kv_heads=8,
        head_dim=256,
        window=4096,
        window_layers=tuple(range(0, 42, 2)),
        params=9_241_705_984,
    ),
    # huggingface.co/tiiuae/falcon-7b config.json (multi_query: one KV head, hidden 4544 / 71)
    KVSpec("Falcon-7B", layers=32, heads=71, kv_heads=1, head_dim=64, params=6_921_720_704),
    # huggingface.co/microsoft/Phi-3-mini-4k-instruct config.json (MHA, hidden 3072 / 32)
    KVSpec("Phi-3-mini", layers=32, heads=32, kv_heads=32, head_dim=96, params=3_821_079_552),
    # huggingface.co/deepseek-ai/DeepSeek-V2-Lite config.json: kv_lora_rank 512,
    # qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128; 15.7B total (model card)
    KVSpec(
        "DeepSeek-V2-Lite",
        layers=27,
        heads=16,
        kv_heads=16,
        head_dim=192,
        v_head_dim=128,
        kv_rank=512,
        rope_dim=64,
        params=15_700_000_000,
    ),
    # huggingface.co/deepseek-ai/DeepSeek-V3 config.json: 61 layers, 128 heads, kv_lora_rank
    # 512, qk_rope_head_dim 64, qk_nope_head_dim 128, v_head_dim 128; 671B total (model card)
    KVSpec(
        "DeepSeek-V3",
        layers=61,
        heads=128,
        kv_heads=128,
        head_dim=192,
        v_head_dim=128,
        kv_rank=512,
        rope_dim=64,
        params=671_000_000_000,
    ),
    # huggingface.co/HuggingFaceTB/SmolLM2-135M config.json (hidden 576 / 9 heads)
    KVSpec("SmolLM2-135M", layers=30, heads=9, kv_heads=3, head_dim=64, params=134_515_008),
    # huggingface.co/openai-community/gpt2 config.json (n_layer 12, n_head 12, n_embd 768)
    KVSpec("GPT-2", layers=12, heads=12, kv_heads=12, head_dim=64, params=124_439_808),
)


def load_spec(model: str) -> KVSpec:
    """A preset name (any case), a config.json (or a directory holding one), or a .gguf file."""
    if model.lower() in PRESETS:
        return PRESETS[model.lower()]
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"{model} is a directory without a config.json")
    if not path.is_file():
        raise ValueError(
            f"{model!r} is neither a preset ({', '.join(s.name for s in PRESETS.values())}) "
            "nor an existing config.json, model directory or .gguf file"
        )
    with open(path, "rb") as f:
        if f.read(4) == b"GGUF":
            return spec_from_gguf(path)
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is neither a GGUF file nor valid JSON: {error}") from error
    spec = spec_from_hf_config(raw, name=path.parent.name or str(path))
    return replace(spec, params=safetensors_params(path.parent))


def safetensors_params(directory: Path) -> int | None:
    """Parameters in a directory's `*.safetensors` files, from their headers (no loading)."""
    total = 0
    for shard in sorted(directory.glob("*.safetensors")):
        with open(shard, "rb") as f:
            try:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{shard} has no readable safetensors header: {error}") from None
        for name, entry in header.items():
            if name != "__metadata__":
                total += math.prod(entry["shape"])
    return total or None


def _first(raw: dict, keys: tuple[str, ...], where: str) -> int:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    raise ValueError(f"{where} lacks {' / '.join(keys)}")


def spec_from_hf_config(raw: dict, name: str = "config.json") -> KVSpec:
    """KVSpec from a Hugging Face config.json dict (Llama, Mistral, Qwen2, Gemma2, GPT-2,
    Falcon, DeepSeek-V2/V3 field names); errors name the missing field."""
    where = f"{name} (config.json)"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must hold a JSON object")
    layers = _first(raw, ("num_hidden_layers", "n_layer", "num_layers"), where)
    heads = _first(raw, ("num_attention_heads", "n_head"), where)
    kv_heads = raw.get("num_key_value_heads") or raw.get("num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if raw.get("multi_query") else heads
    kv_rank, rope_dim, v_head_dim = raw.get("kv_lora_rank"), None, raw.get("v_head_dim")
    if kv_rank is not None:
        rope_dim = _first(raw, ("qk_rope_head_dim",), where)
        head_dim = _first(raw, ("qk_nope_head_dim",), where) + rope_dim
    elif raw.get("head_dim") is not None:
        head_dim = raw["head_dim"]
    else:
        head_dim = _first(raw, ("hidden_size", "n_embd"), where) // heads
    window, window_layers = raw.get("sliding_window"), None
    if raw.get("use_sliding_window") is False:
        window = None
    if window is not None:
        types = raw.get("layer_types")
        if types is not None:
            window_layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
        elif raw.get("model_type") == "gemma2":
            window_layers = tuple(range(0, layers, 2))  # transformers: even layers slide
        if window_layers == ():
            window = window_layers = None
    return KVSpec(
        name,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim if v_head_dim != head_dim else None,
        window=window,
        window_layers=window_layers,
        kv_rank=kv_rank,
        rope_dim=rope_dim,
    )


def spec_from_gguf(path: str | Path) -> KVSpec:
    """KVSpec from a GGUF file's `{arch}.*` metadata; parameters counted from its tensors."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as error:  # a truncated or corrupt file
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error

    def get(key: str, default=...):
        field = reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{path}: GGUF metadata lacks {key!r}")
            return default
        if len(field.data) != 1:
            raise ValueError(f"{path}: GGUF metadata {key!r} is per layer; not supported")
        value = field.parts[field.data[0]]
        return bytes(value).decode() if key == "general.architecture" else int(value[0])

    arch = get("general.architecture")
    heads = get(f"{arch}.attention.head_count")
    head_dim = get(f"{arch}.attention.key_length", None)
    if head_dim is None:
        head_dim = get(f"{arch}.embedding_length") // heads
    v_head_dim = get(f"{arch}.attention.value_length", head_dim)
    kv_rank = get(f"{arch}.attention.kv_lora_rank", None)
    rope_dim = None if kv_rank is None else get(f"{arch}.rope.dimension_count")
    layers = get(f"{arch}.block_count")
    window = get(f"{arch}.attention.sliding_window", None)
    window_layers = tuple(range(0, layers, 2)) if window and arch == "gemma2" else None
    return KVSpec(
        path.stem,
        layers=layers,
        heads=heads,
        kv_heads=get(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim,
        v_head_dim=v_head_dim if v_head_dim != head_dim else None,
        window=window or None,
        window_layers=window_layers,
        kv_rank=kv_rank,
        rope_dim=rope_dim,
        params=sum(int(t.n_elements) for t in reader.tensors) or None,
    )
