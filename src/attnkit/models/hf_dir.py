"""Reading a Llama-family model from a Hugging Face directory (config.json + safetensors)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from attnkit.layers.rope import RopeScaling
from attnkit.models.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.q_proj.bias": "attn.wq.bias",
    "self_attn.k_proj.bias": "attn.wk.bias",
    "self_attn.v_proj.bias": "attn.wv.bias",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "self_attn.o_proj.bias": "attn.wo.bias",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def read_config(directory: Path) -> LlamaConfig:
    """LlamaConfig from `config.json`; errors name the missing field or unsupported type."""
    path = directory / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} has no config.json") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    )
    missing = [key for key in required if key not in raw]
    if missing:
        raise ValueError(f"{path} lacks required fields {missing}")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    if raw.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias=true (biases in the MLP) is not supported")
    # Llama's attention_bias puts a bias on q, k, v and o; Qwen2 has q, k, v biases only.
    qkv_bias = raw.get("attention_bias", model_type == "qwen2")
    out_bias = model_type != "qwen2" and bool(raw.get("attention_bias", False))
    window, layer_types = _sliding_window(raw, model_type)
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        head_dim=raw.get("head_dim"),
        rope_theta=float(theta),
        rope_scaling=RopeScaling.from_hf(rope, raw.get("max_position_embeddings")),
        rope_interleaved=False,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
        attention_bias=bool(qkv_bias),
        attention_out_bias=out_bias,
        sliding_window=window,
        layer_types=layer_types,
    )


def _sliding_window(raw: dict, model_type: str) -> tuple[int | None, tuple[str, ...] | None]:
    """(window, per-layer types) as transformers reads them for Mistral and Qwen2 configs."""
    window = raw.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, None
    if raw.get("layer_types"):
        return window, tuple(raw["layer_types"])
    if model_type == "mistral":
        return window, None  # every layer slides
    if not raw.get("use_sliding_window", False):
        return None, None
    # Qwen2: layers from max_window_layers on slide; the ones before attend globally.
    first = raw.get("max_window_layers", 28)
    n = raw["num_hidden_layers"]
    return window, tuple("sliding_attention" if i >= first else "full_attention" for i in range(n))


def read_weights(directory: Path) -> dict[str, Tensor]:
    """All `*.safetensors` shards of the directory, renamed to attnkit's parameter names."""
    from safetensors.torch import load_file

    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{directory} has no *.safetensors weight files")
    state: dict[str, Tensor] = {}
    for shard in shards:
        for name, tensor in load_file(shard).items():
            target = _attnkit_name(name)
            if target is not None:
                state[target] = tensor.to(torch.float32)
    return state


def _attnkit_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blocks.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # a cached buffer some checkpoints carry, derived from the config
    raise ValueError(f"unexpected weight {hf_name!r} for a Llama-family model")
