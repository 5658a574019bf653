"""The Llama decoder on tiny random configs: cache decoding equals one full forward."""

from __future__ import annotations

import pytest
import torch

from attn_testing import assert_ragged_batch_decodes_as_alone, tiny_transformer
from attnkit.models.llama import LlamaConfig, Transformer


def tiny(seed: int = 0, **overrides) -> Transformer:
    return tiny_transformer(seed, **overrides)


@pytest.mark.parametrize("chunks", [[10, 4, 6], [1] * 20, [19, 1], [20]], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@torch.no_grad()
def test_decoding_through_the_cache_equals_one_full_forward(chunks, interleaved):
    model = tiny(rope_interleaved=interleaved)
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    cache, pieces, start = model.new_cache(2, initial_len=8), [], 0  # forces growth too
    for n in chunks:
        pieces.append(model(ids[:, start : start + n], cache=cache))
        start += n
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-12
    assert cache.length(0) == cache.length(1) == 20


@torch.no_grad()
def test_last_prefill_row_equals_first_decode_row():
    model = tiny()
    ids = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(2))
    prefill = model(ids)
    cache = model.new_cache(1)
    model(ids[:, :11], cache=cache)
    decoded = model(ids[:, 11:], cache=cache)
    assert (prefill[:, -1] - decoded[:, 0]).abs().max() < 1e-12


@torch.no_grad()
def test_ragged_batch_decodes_each_sequence_as_if_alone():
    model = tiny()
    assert_ragged_batch_decodes_as_alone(model)  # float64 model: 1e-12


@torch.no_grad()
def test_future_tokens_do_not_change_earlier_logits():
    model = tiny()
    ids = torch.randint(0, 101, (1, 16), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 101
    assert torch.equal(model(ids)[:, :9], model(changed)[:, :9])
    assert not torch.equal(model(ids)[:, 9:], model(changed)[:, 9:])


@torch.no_grad()
def test_last_only_and_logits_at_pick_rows_of_the_full_logits():
    model = tiny()
    ids = torch.randint(0, 101, (3, 9), generator=torch.Generator().manual_seed(5))
    full = model(ids)
    # float64; the LM head's matmul over fewer rows may round differently: 1e-12
    assert (model(ids, last_only=True) - full[:, -1:]).abs().max() < 1e-12
    at = torch.tensor([8, 0, 4])
    picked = model(ids, logits_at=at)
    assert picked.shape == (3, 1, full.shape[-1])
    assert (picked[:, 0] - full[torch.arange(3), at]).abs().max() < 1e-12


@torch.no_grad()
def test_logits_at_through_a_ring_buffer_fed_in_pieces():
    model = tiny(sliding_window=4)
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(6))
    full = model(ids, cache=model.new_cache(2, max_new_per_step=3))
    cache = model.new_cache(2, max_new_per_step=3)  # 11 tokens go in pieces of 3
    picked = model(ids, cache=cache, logits_at=torch.tensor([10, 3]))
    assert (picked[:, 0] - full[torch.arange(2), torch.tensor([10, 3])]).abs().max() < 1e-12


@pytest.mark.parametrize(
    ("logits_at", "kwargs", "message"),
    [
        (torch.tensor([1, 2]), {}, r"logits_at must be \(batch,\) = \(3,\) integer positions"),
        (torch.tensor([1.0, 2.0, 0.0]), {}, "integer positions, got .* torch.float32"),
        (torch.tensor([True, False, True]), {}, "integer positions, got .* torch.bool"),
        (torch.tensor([0, 1, 1], dtype=torch.uint8), {}, "integer positions, got .* torch.uint8"),
        (torch.tensor([0, 5, 1]), {}, r"logits_at must lie in \[0, seq = 5\), got \[0, 5\]"),
        (torch.tensor([0, -1, 1]), {}, r"logits_at must lie in \[0, seq = 5\), got \[-1, 1\]"),
        (torch.tensor([0, 1, 1]), {"last_only": True}, "last_only=True or logits_at, not both"),
    ],
)
def test_bad_logits_at(logits_at, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny()(torch.zeros(3, 5, dtype=torch.long), logits_at=logits_at, **kwargs)


def test_tied_embeddings_share_one_tensor():
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed.weight


def test_bad_input_ids_shape():
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\), got shape \(5,\)"):
        tiny()(torch.zeros(5, dtype=torch.long))


def test_seq_ids_must_match_the_batch():
    model = tiny()
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="input_ids has batch 1 but seq_ids names 2 sequences"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_key_value_heads", 4, "must be a multiple of num_key_value_heads"),
        ("hidden_size", 0, "hidden_size must be an integer >= 1"),
        ("rms_norm_eps", 0.0, "rms_norm_eps must be > 0"),
        ("hidden_size", 50, "not divisible by num_attention_heads"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    config = dict(
        vocab_size=10,
        hidden_size=54,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
    )
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**(config | {field: value}))


def _decode_logits(model, prompts, steps: int) -> torch.Tensor:
    """Each prompt prefilled alone, then `steps` greedy decode steps of the whole batch."""
    cache = model.new_cache(len(prompts))
    last = [model(p.view(1, -1), cache=cache, seq_ids=[i])[:, -1] for i, p in enumerate(prompts)]
    logits, out = torch.cat(last), []
    for _ in range(steps):
        logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
        out.append(logits)
    return torch.stack(out, 1)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_fused_decode_blocks_match_the_float64_model(interleaved, bias, monkeypatch):
    # float32 decode steps take ops.decode_block (two C++ calls a block, when the whole
    # stack does not run in one, tests/models/test_stacked_decode.py); against the same
    # weights in float64, their error must stay within 2x that of the unfused float32 ops.
    from attnkit.models import llama
    from attnkit.ops import decode_block

    model64 = tiny(5, rope_interleaved=interleaved, attention_bias=bias, attention_out_bias=bias)
    model32 = tiny(5, rope_interleaved=interleaved, attention_bias=bias, attention_out_bias=bias)
    model32.float()
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 101, (n,), generator=gen) for n in (5, 9, 40)]  # 40: unfused
    want = _decode_logits(model64, prompts, 6)
    calls = []
    fused_call = decode_block.attention_inputs

    def counted(*args):
        calls.append(args[0].shape)
        return fused_call(*args)

    monkeypatch.setattr(llama.decode_block, "attention_inputs", counted)
    model32._stacked_decode = lambda *args: None  # block by block (the stack: its own tests)
    fused = _decode_logits(model32, prompts, 6)
    assert (1, 40, 54) not in calls  # past MAX_ROWS rows: the unfused path
    assert calls.count((3, 1, 54)) == 6 * 3  # every decode step, every layer
    monkeypatch.setattr(llama.decode_block, "fusable", lambda *a: False)
    plain = _decode_logits(model32, prompts, 6)
    err, plain_err = ((t.double() - want).abs().max().item() for t in (fused, plain))
    assert err <= 2 * plain_err + 1e-5, (err, plain_err)


@torch.no_grad()
def test_hooks_and_stand_in_layers_keep_the_unfused_path(monkeypatch):
    # The fused calls would skip a hook's module (MLA conversion records attention inputs
    # with a pre-hook) or a stand-in layer's own forward (a LoRA Linear, say).
    from attnkit.layers.projection import Linear
    from attnkit.models import llama

    model = tiny(7).float()
    fused_blocks = []
    fused_forward = llama.Block._fused_forward

    def recorded(block, *args):
        fused_blocks.append(block)
        return fused_forward(block, *args)

    monkeypatch.setattr(llama.Block, "_fused_forward", recorded)
    seen = []
    handle = model.blocks[1].attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    cache = model.new_cache(1)
    model(torch.randint(0, 101, (1, 4)), cache=cache)
    model(torch.randint(0, 101, (1, 1)), cache=cache)
    handle.remove()
    assert seen == [(1, 4, 54), (1, 1, 54)]
    assert model.blocks[1] not in fused_blocks and model.blocks[0] in fused_blocks

    fused_blocks.clear()
    global_seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, out: global_seen.append(type(m))
    )
    try:
        model(torch.randint(0, 101, (1, 1)), cache=cache)
    finally:
        handle.remove()
    assert llama.FeedForward in global_seen and not fused_blocks

    class Doubled(Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    block = model.blocks[0]
    doubled = Doubled(54, 54, bias=False)
    doubled.weight.data = block.attn.wo.weight.data / 2
    block.attn.wo = doubled
    model(torch.randint(0, 101, (1, 1)), cache=cache)
    assert block not in fused_blocks and model.blocks[2] in fused_blocks


@torch.no_grad()
def test_mlp_biases_and_instance_forwards_keep_the_unfused_path():
    # block_outputs has no MLP biases, and a forward set on one module instance (an
    # ablation, say) is that module's behaviour: both must reach the unfused path, whose
    # result is the oracle here.
    from attnkit.models import llama

    def decode(model, fused: bool = True):
        with pytest.MonkeyPatch.context() as patch:
            if not fused:
                patch.setattr(llama.decode_block, "fusable", lambda *a: False)
            cache = model.new_cache(1)
            model(torch.arange(5).view(1, -1), cache=cache)
            return model(torch.tensor([[7]]), cache=cache)

    model = tiny(8).float()
    model.blocks[1].mlp.down.bias = torch.nn.Parameter(torch.randn(54))
    assert (decode(model) - decode(model, fused=False)).abs().max() < 1e-5

    model = tiny(8).float()
    mlp = model.blocks[2].mlp
    mlp.forward = lambda x: torch.zeros_like(x)  # ablate one block's MLP
    ablated = decode(model)
    assert (ablated - decode(model, fused=False)).abs().max() < 1e-5
    del mlp.forward
    assert (decode(model) - ablated).abs().max() > 1e-3  # the ablation did change the output


@pytest.mark.parametrize("kind", ["contiguous", "paged", "ring"])
def test_gradients_through_a_cache_equal_those_of_one_full_forward(kind):
    """Training through a cache (prefill, then two decode steps, gradients recorded): the
    contiguous cache keeps every layer in one buffer, whose next layer's write used to
    invalidate the views saved for the previous layer's backward."""
    from attnkit.cache import SlidingWindowCache
    from attnkit.cache.paged import PagedCache

    model = tiny()
    c = model.config
    shape = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    pieces = [torch.tensor([[1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 10]])]
    pieces += [torch.tensor([[9], [10]]), torch.tensor([[11], [12]])]
    caches = {
        "contiguous": lambda: model.new_cache(2),
        "paged": lambda: PagedCache(*shape, num_blocks=8, block_size=4, dtype=torch.float64),
        "ring": lambda: SlidingWindowCache(*shape, window=64, max_seqs=2, dtype=torch.float64),
    }
    cache = caches[kind]()
    while len(cache.sequences) < 2:
        cache.add_sequence()
    weight = model.blocks[0].mlp.down.weight

    model(torch.cat(pieces, 1))[:, -3:].square().sum().backward()
    want, weight.grad = weight.grad, None
    logits = torch.cat([model(ids, cache=cache) for ids in pieces], 1)
    logits[:, -3:].square().sum().backward()

    torch.testing.assert_close(weight.grad, want, rtol=0, atol=1e-12)
