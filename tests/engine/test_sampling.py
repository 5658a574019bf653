"""Token choice: greedy, temperature, top-k, top-p, seeding, and parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.engine.sampling import SamplingParams, next_tokens


def logits(seed: int = 0, batch: int = 4, vocab: int = 50) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    x = logits()
    assert torch.equal(next_tokens(x, SamplingParams(), None), x.argmax(-1))


@pytest.mark.parametrize("params", [SamplingParams(1.0, top_k=1), SamplingParams(1.0, top_p=1e-6)])
def test_filters_at_their_narrowest_are_greedy(params):
    x = logits(1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert torch.equal(next_tokens(x, params, gen), x.argmax(-1))


def test_top_k_samples_only_from_the_k_best():
    x = logits(2, batch=1)
    allowed = set(x[0].topk(5).indices.tolist())
    gen = torch.Generator().manual_seed(1)
    seen = {int(next_tokens(x, SamplingParams(2.0, top_k=5), gen)) for _ in range(300)}
    assert seen <= allowed and len(seen) >= 3


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(2)
    seen = {int(next_tokens(x, SamplingParams(1.0, top_p=0.75), gen)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 needs the second token; 0.8 reaches it


def test_temperature_one_samples_the_softmax_distribution():
    x = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).expand(20000, 3)
    counts = torch.bincount(next_tokens(x, SamplingParams(1.0), torch.Generator().manual_seed(3)))
    freq = counts.double() / counts.sum()
    # 20000 draws: the standard error of each frequency is below 0.0035; allow ~4 sigma.
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), atol=0.015)


def test_a_seed_makes_sampling_reproducible():
    x = logits(4)

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return [next_tokens(x, SamplingParams(1.0), gen).tolist() for _ in range(5)]

    assert draw(7) == draw(7) and draw(7) != draw(8)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_parameters_at_their_limits_are_accepted():
    SamplingParams(temperature=0.0, top_k=1, top_p=1.0)
