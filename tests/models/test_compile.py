"""`torch.compile` of a model: cache-free forwards compile (training, scoring); forwards with
a cache run outside the graph, and blocks compiled one by one call their caches outside
theirs (both through `cache.base.cache_call`), since dynamo traced a cache's in-place
writes into a wrong view (an AssertionError inside torch) before they did.

Tolerance: compiled and eager float32 logits agree within 1e-5 (Inductor may fuse and
reorder the norms' and activations' float32 arithmetic; logits are ~1).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from attn_testing import tiny_transformer
from attnkit.cache.paged import PagedCache

# graph breaks around the C++ kernels are expected (dynamo warns of each), and torch 2.13's
# compile scripts some of its own functions, which it warns of too
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script"),
]


@pytest.fixture(autouse=True)
def quiet_dynamo():
    torch._logging.set_logs(dynamo=logging.ERROR)
    yield
    torch._logging.set_logs()
    torch._dynamo.reset()


def new_cache(model, kind: str):
    if kind == "contiguous":
        return model.new_cache(2)
    c = model.config
    cache = PagedCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks=8)
    for _ in range(2):
        cache.add_sequence()
    return cache


@torch.no_grad()
@pytest.mark.parametrize("regional", [False, True], ids=["whole model", "block by block"])
@pytest.mark.parametrize("kind", ["contiguous", "paged"])
def test_a_compiled_model_decodes_through_a_cache_as_the_eager_one(kind, regional):
    """Compiled whole (its cached forwards run eagerly) or block by block (each attention
    layer's cache calls run outside the block's graph)."""
    model = tiny_transformer(4).float()
    compiled = copy.deepcopy(model)
    if regional:
        for block in compiled.blocks:
            block.compile()
    else:
        compiled = torch.compile(compiled)
    steps = [torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]), torch.tensor([[11], [12]])]
    steps.append(torch.tensor([[13], [14]]))
    eager_cache, compiled_cache = new_cache(model, kind), new_cache(model, kind)
    for ids in steps:
        want = model(ids, cache=eager_cache)
        got = compiled(ids, cache=compiled_cache)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert compiled_cache.length(1) == eager_cache.length(1) == 7


def test_a_compiled_cache_free_forward_trains_as_the_eager_one():
    model = tiny_transformer(5).float()
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(5))
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(ids), model(ids), rtol=0, atol=1e-5)
    compiled(ids).square().mean().backward()
    got = model.embed.weight.grad.clone()
    model.zero_grad()
    model(ids).square().mean().backward()
    torch.testing.assert_close(got, model.embed.weight.grad, rtol=0, atol=1e-6)


@torch.no_grad()
def test_compiled_in_place_with_hooks_runs_each_once_per_call():
    """`model.compile()` compiles the module's own call: the eager forward with a cache must
    not go back through it (it recursed), and the model's forward hooks run once a call."""
    model, calls = tiny_transformer(6).float(), []
    model.register_forward_hook(lambda *args: calls.append(1))
    want = model(torch.tensor([[1, 2, 3]]), cache=model.new_cache(1))
    model.compile()
    got = model(torch.tensor([[1, 2, 3]]), cache=model.new_cache(1))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert len(calls) == 2
