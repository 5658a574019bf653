"""Reading a Llama-architecture model from a GGUF file (llama.cpp's format).

Weights are dequantized to float32 by the `gguf` package. llama.cpp's converter permutes
the rows of the Q and K projections so that RoPE rotates adjacent pairs; rather than undo
that, the model runs RoPE in the interleaved layout, which computes the same q·k.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnkit.layers.rope import DynamicNTKScaling, LinearScaling, RopeScaling, YarnScaling
from attnkit.models.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = ("llama",)
GGUF_MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "mlp_norm.weight",
    "attn_q.weight": "attn.wq.weight",
    "attn_k.weight": "attn.wk.weight",
    "attn_v.weight": "attn.wv.weight",
    "attn_q.bias": "attn.wq.bias",
    "attn_k.bias": "attn.wk.bias",
    "attn_v.bias": "attn.wv.bias",
    "attn_output.weight": "attn.wo.weight",
    "attn_output.bias": "attn.wo.bias",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def is_gguf(path: Path) -> bool:
    """True if the file starts with GGUF's magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, Tensor]]:
    """The model config and a float32 state dict (attnkit names) from a GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    if not is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as error:  # a truncated or corrupt file
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error
    meta = _Metadata(reader, path)
    config = meta.config(n_tokens=_vocab_size(reader))
    state: dict[str, Tensor] = {}
    for tensor in reader.tensors:
        name = _attnkit_name(tensor.name, path)
        if name is None:
            continue
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(
                f"{path}: tensor {tensor.name} uses quantization {tensor.tensor_type.name}, "
                f"which the installed gguf package cannot dequantize ({error})"
            ) from error
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32))  # a writable copy
    return config, state


def _attnkit_name(gguf_name: str, path: Path) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blocks.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    if gguf_name == "rope_freqs.weight":
        raise ValueError(
            f"{path}: per-dimension RoPE frequency factors (rope_freqs.weight, as in Llama 3.1 "
            "GGUFs) are not supported yet; load the Hugging Face directory instead"
        )
    raise ValueError(f"{path}: unexpected tensor {gguf_name!r} for a Llama-architecture model")


def _vocab_size(reader) -> int:
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise ValueError("the GGUF file has no token_embd.weight tensor")
    return int(embed.shape[-1])


class _Metadata:
    """Typed access to GGUF key/value metadata, with errors naming the missing key."""

    def __init__(self, reader, path: Path) -> None:
        self.reader, self.path = reader, path
        self.arch = self.get("general.architecture", str)
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{path}: architecture {self.arch!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

    def get(self, key: str, kind: type, default=...):
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise ValueError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        value = field.parts[field.data[0]]
        return bytes(value).decode() if kind is str else kind(value[0])

    def config(self, n_tokens: int) -> LlamaConfig:
        a = self.arch
        heads = self.get(f"{a}.attention.head_count", int)
        hidden = self.get(f"{a}.embedding_length", int)
        head_dim = self.get(f"{a}.attention.key_length", int, hidden // heads)
        rope_dim = self.get(f"{a}.rope.dimension_count", int, head_dim)
        if rope_dim != head_dim:
            raise ValueError(f"{self.path}: partial rotary ({rope_dim} of {head_dim}) unsupported")
        has_output = any(t.name == "output.weight" for t in self.reader.tensors)
        context = self.get(f"{a}.context_length", int)
        return LlamaConfig(
            vocab_size=n_tokens,
            hidden_size=hidden,
            intermediate_size=self.get(f"{a}.feed_forward_length", int),
            num_hidden_layers=self.get(f"{a}.block_count", int),
            num_attention_heads=heads,
            num_key_value_heads=self.get(f"{a}.attention.head_count_kv", int, heads),
            head_dim=head_dim,
            rope_theta=self.get(f"{a}.rope.freq_base", float, 10000.0),
            rope_scaling=self._rope_scaling(context),
            rope_interleaved=True,
            rms_norm_eps=self.get(f"{a}.attention.layer_norm_rms_epsilon", float),
            max_position_embeddings=context,
            tie_word_embeddings=not has_output,
            attention_bias=any(t.name.endswith("attn_q.bias") for t in self.reader.tensors),
            attention_out_bias=any(
                t.name.endswith("attn_output.bias") for t in self.reader.tensors
            ),
        )

    def _rope_scaling(self, context: int) -> RopeScaling:
        a = self.arch
        kind = self.get(f"{a}.rope.scaling.type", str, "none")
        if kind == "none":
            return RopeScaling()
        factor = self.get(f"{a}.rope.scaling.factor", float)
        original = self.get(f"{a}.rope.scaling.original_context_length", int, context)
        if kind == "linear":
            return LinearScaling(factor=factor)
        if kind == "yarn":
            return YarnScaling(factor=factor, original_max_position_embeddings=original)
        if kind == "dynamic":
            return DynamicNTKScaling(factor=factor, original_max_position_embeddings=original)
        raise ValueError(f"{self.path}: RoPE scaling type {kind!r} is not supported")
