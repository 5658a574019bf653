"""with_rope_scaling: a model copy whose only difference is its RoPE scaling."""

from __future__ import annotations

import pytest
import torch
from test_llama import tiny

from attnkit.layers.rope import DynamicNTKScaling, LinearScaling, YarnScaling
from attnkit.models.convert.rope import with_rope_scaling
from attnkit.models.llama import Transformer

SCALINGS = [
    LinearScaling(factor=2.0),
    DynamicNTKScaling(factor=2.0, original_max_position_embeddings=16),
    YarnScaling(factor=4.0, original_max_position_embeddings=16),
]


@pytest.mark.parametrize("scaling", SCALINGS, ids=lambda s: s.kind)
@torch.no_grad()
def test_the_copy_equals_a_model_built_with_that_scaling_and_leaves_the_original(scaling):
    model = tiny(max_position_embeddings=16)
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    before = model(ids)
    scaled = with_rope_scaling(model, scaling)
    built = Transformer(scaled.config).double().eval()
    built.load_state_dict(model.state_dict())
    assert (scaled(ids) - built(ids)).abs().max() < 1e-12
    assert (scaled(ids) - before).abs().max() > 1e-6  # 40 tokens: past the 16 it stretches
    assert (model(ids) - before).abs().max() == 0 and model.config.rope_scaling.kind == "none"
    assert scaled.embed.weight is model.embed.weight  # weights shared, not copied


def test_dynamic_ntk_within_the_original_length_changes_nothing():
    model = tiny(max_position_embeddings=16)
    ids = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(1))
    scaled = with_rope_scaling(model, SCALINGS[1])
    assert (scaled(ids) - model(ids)).abs().max() < 1e-12


def test_scaling_must_be_a_rope_scaling():
    with pytest.raises(TypeError, match="scaling must be a RopeScaling, got dict"):
        with_rope_scaling(tiny(), {"rope_type": "linear"})
