"""`gathered`: both key layouts (strided band views, copied tiles) match the float64
reference, and each is taken where it should be. Tolerance: the 2x rule of attn_testing."""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attn_testing import assert_matches_reference, random_qkv
from attnkit import masks
from attnkit.ops.backends import GatheredBackend
from attnkit.ops.backends import gathered as module

EYE = torch.eye(5, dtype=torch.bool)
FIRST = EYE.clone()
FIRST[:, 0] = True  # every block also sees the first one: not a band
CASES = {
    "window": (masks.sliding_window(70), "band"),
    "chunked-prefill window": (masks.sliding_window(33), "band"),
    "window & padding": (masks.sliding_window(50) & masks.padding([300, 141]), "band"),
    "window + sinks": (masks.sliding_window(70) | masks.sinks(3), "tiles"),
    "block-diagonal": (masks.causal() & masks.block_sparse(EYE, 64), "band"),
    "block-diagonal + first block": (masks.causal() & masks.block_sparse(FIRST, 64), "tiles"),
}


@pytest.mark.parametrize("name", CASES)
def test_layout_choice_and_result(name, monkeypatch):
    mask, layout = CASES[name]
    taken = []
    for cls, label in ((module._BandedKeys, "band"), (module._GatheredKeys, "tiles")):
        original = cls.__init__

        def spy(self, *args, _original=original, _label=label, **kwargs):
            taken.append(_label)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", spy)
    gen = torch.Generator().manual_seed(len(name))
    n_q = 250 if name == "chunked-prefill window" else 300  # queries after 50 cached keys
    q, k, v = random_qkv(gen, batch=2, heads=6, kv_heads=2, n_q=n_q, n_k=300, head_dim=32)
    assert_matches_reference(GatheredBackend(chunk=32, max_keys=2**14), q, k, v, mask=mask)
    assert taken == [layout]


def test_non_finite_keys_take_the_copy_that_zeroes_them():
    gen = torch.Generator().manual_seed(9)
    q, k, v = random_qkv(gen, batch=2, n_q=200, n_k=200, head_dim=32)
    lengths = [200, 90]
    k[1, :, 90:], v[1, :, 90:] = math.nan, math.inf  # unused cache slots
    mask = masks.sliding_window(40) & masks.padding(lengths)
    out = attnkit.attention(q, k, v, mask, backend=GatheredBackend(chunk=32))
    clean_k, clean_v = (torch.nan_to_num(t, nan=0.0, posinf=0.0) for t in (k, v))
    want = attnkit.attention(q, clean_k, clean_v, mask, backend="reference")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"chunk": 0}, "chunk"), ({"max_keys": -3}, "max_keys")]
)
def test_bad_sizes_are_refused_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1, got"):
        GatheredBackend(**kwargs)
