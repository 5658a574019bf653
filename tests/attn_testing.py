"""Helpers shared by the attention tests: random inputs and the tolerance rule."""

from __future__ import annotations

import torch
from torch import Tensor

import attnkit

# Representation noise of each dtype at O(1) values: the floor under the 2x rule, so that
# a float64 candidate is not asked to beat an error of exactly zero.
NOISE_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 4 * torch.finfo(torch.float32).eps,
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,
    torch.float16: 4 * torch.finfo(torch.float16).eps,
}


def random_qkv(
    gen: torch.Generator,
    batch: int = 2,
    heads: int = 9,
    kv_heads: int = 3,
    n_q: int = 7,
    n_k: int = 7,
    head_dim: int = 16,
    v_head_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fresh normal q, k, v drawn from `gen` (shapes as `attnkit.attention` takes them)."""

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return (
        draw(batch, heads, n_q, head_dim),
        draw(batch, kv_heads, n_k, head_dim),
        draw(batch, kv_heads, n_k, v_head_dim or head_dim),
    )


def max_err(a: Tensor, b: Tensor) -> float:
    """Max abs difference in float64, treating equal infinities (lse -inf) as equal."""
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & (a == b)
    return (a - b).masked_fill(same_inf, 0).abs().max().item() if a.numel() else 0.0


def returns_lse(backend: str | attnkit.ops.backends.Backend) -> bool:
    """Whether the backend can return the log-sum-exp (those built on torch SDPA cannot)."""
    chosen = backend if isinstance(backend, attnkit.ops.backends.Backend) else None
    name = chosen.name if chosen is not None else backend
    return name not in ("sdpa", "gathered")


def assert_matches_reference(
    backend: str | attnkit.ops.backends.Backend, q: Tensor, k: Tensor, v: Tensor, **kwargs
) -> None:
    """The tolerance rule: error vs float64 reference <= 2x plain PyTorch's in q's dtype.

    "Plain PyTorch" is the `reference` backend run in the candidate's dtype. Checks the
    output and, when the candidate returns it, the log-sum-exp. Any NaN fails.
    """
    want, want_lse = attnkit.attention(
        q.double(), k.double(), v.double(), backend="reference", return_lse=True, **kwargs
    )
    plain, plain_lse = attnkit.attention(q, k, v, backend="reference", return_lse=True, **kwargs)
    wants_lse = kwargs.get("softcap") is not None or returns_lse(backend)
    got = attnkit.attention(q, k, v, backend=backend, return_lse=wants_lse, **kwargs)
    got, got_lse = got if wants_lse else (got, None)

    assert got.dtype == q.dtype and got.shape == want.shape
    assert not torch.isnan(got).any(), "NaN in output"
    floor = NOISE_FLOOR[q.dtype]
    err, plain_err = max_err(got, want), max_err(plain, want)
    assert err <= 2 * plain_err + floor, f"output error {err:.3g} > 2 x {plain_err:.3g} + {floor}"
    if got_lse is not None:
        assert not torch.isnan(got_lse).any(), "NaN in lse"
        assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse)), "lse -inf rows differ"
        err, plain_err = max_err(got_lse, want_lse), max_err(plain_lse, want_lse)
        assert err <= 2 * plain_err + floor, f"lse error {err:.3g} > 2 x {plain_err:.3g}"


@torch.no_grad()
def assert_ragged_batch_decodes_as_alone(model, vocab: int = 101) -> None:
    """Three prompts of different lengths prefilled one by one into one cache, then decoded
    together for 5 steps, give each sequence the logits of its own uncached forward."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (1, n), generator=gen) for n in (9, 4, 13)]
    steps = torch.randint(0, vocab, (3, 5), generator=gen)
    cache = model.new_cache(0, max_seqs=3)
    seqs = [cache.add_sequence() for _ in prompts]
    for seq, prompt in zip(seqs, prompts, strict=True):
        model(prompt, cache=cache, seq_ids=[seq])
    together = torch.cat([model(steps[:, i : i + 1], cache=cache) for i in range(5)], dim=1)
    for b, prompt in enumerate(prompts):
        alone = model(torch.cat([prompt, steps[b : b + 1]], dim=1))[:, -5:]
        assert (together[b] - alone[0]).abs().max() < 1e-12


# A Llama small enough for float64 oracles: awkward sizes, GQA 9 query / 3 KV heads.
TINY_LLAMA = dict(
    vocab_size=101,
    hidden_size=54,
    intermediate_size=70,
    num_hidden_layers=3,
    num_attention_heads=9,
    num_key_value_heads=3,
    rope_theta=1000.0,
)


def tiny_transformer(seed: int = 0, attention=None, **overrides):
    """`TINY_LLAMA` (with `overrides`) in float64, eval mode; `attention` = layer factory."""
    from attnkit.models.llama import LlamaConfig, Transformer

    torch.manual_seed(seed)
    config = LlamaConfig(**(TINY_LLAMA | overrides))
    model = Transformer(config) if attention is None else Transformer(config, attention)
    return model.double().eval()
