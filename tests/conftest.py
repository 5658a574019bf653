"""Shared fixtures: the real SmolLM2-135M (attnkit's and Hugging Face's), loaded once per
session; Triton's interpreter where there is no GPU; the C++ kernels built on every host."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU-only machines
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The decode kernels (tuned for AVX-512 and AVX2) are checked for correctness on any host,
# ARM included (outside tests, such hosts leave them to torch: `attnkit.ops.cpp_build`).
os.environ.setdefault("ATTNKIT_WIDE_VECTOR_KERNELS", "1")


@pytest.fixture
def cpp_switched_off(monkeypatch):
    """ATTNKIT_NO_CPP=1 for one test: the process reads it once, so read again on both sides."""
    from attnkit.ops.cpp_build import cpp_kernels_enabled

    monkeypatch.setenv("ATTNKIT_NO_CPP", "1")
    cpp_kernels_enabled.cache_clear()
    yield
    cpp_kernels_enabled.cache_clear()  # before monkeypatch restores the variable: read anew


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) from attnkit.models.load_model's default."""
    from attnkit.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' LlamaForCausalLM read from the same GGUF file (the reference)."""
    from transformers import AutoModelForCausalLM

    from attnkit.models.loading import smollm2_path

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()
