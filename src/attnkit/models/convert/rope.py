"""Another RoPE scaling on a loaded model: context extension without retraining."""

from __future__ import annotations

import copy
from dataclasses import replace

from attnkit.layers.rope import RopeScaling
from attnkit.models.llama import Transformer, rotary_for


def with_rope_scaling(model: Transformer, scaling: RopeScaling) -> Transformer:
    """A copy of `model` whose rotary embedding uses `scaling` (linear, dynamic NTK, YaRN …).

    The weights are shared with `model` (RoPE has none: its frequencies come from the
    config), so the copy costs no memory; only the config and the rotary module differ.
    """
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}")
    rescaled = copy.copy(model)
    rescaled._modules = dict(model._modules)  # own module table: replacing rope stays local
    rescaled.config = replace(model.config, rope_scaling=scaling)
    rescaled.rope = rotary_for(rescaled.config).to(next(model.parameters()).device)
    return rescaled
