"""K/V-head conversions: MHA expansion is exact, mean-pooling matches a hand-pooled model."""

from __future__ import annotations

import pytest
import torch

from attnkit.layers.attention import Attention
from attnkit.models.convert.heads import expand_to_mha, kv_bytes_per_token, pool_kv_heads
from attnkit.models.llama import Transformer
from attnkit.tools.corpus import corpus_tokens
from models.test_llama import tiny

F32_EPS = torch.finfo(torch.float32).eps


def ids_for(model: Transformer, batch: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, n), generator=gen)


def snapshot(model: Transformer) -> dict[str, torch.Tensor]:
    """Copies of the attention weights (what a conversion could touch) and the head counts."""
    state = {k: v.clone() for k, v in model.state_dict().items() if ".attn." in k}
    return state | {f"{i}.n_kv_heads": b.attn.n_kv_heads for i, b in enumerate(model.blocks)}


def assert_unchanged(model: Transformer, before: dict[str, torch.Tensor], config) -> None:
    assert model.config == config and snapshot(model).keys() == before.keys()
    assert all(
        torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k]
        for k, v in snapshot(model).items()
    )


def assert_same_weights(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hand_pooled(model: Transformer, n_kv_heads: int) -> Transformer:
    """The pooled model built independently: a fresh model, each new head a loop-summed mean."""
    config = model.config
    d, old = config.head_dim, config.num_key_value_heads
    r = old // n_kv_heads
    ref = Transformer(type(config)(**{**vars(config), "num_key_value_heads": n_kv_heads}))
    ref = ref.to(next(model.parameters()).dtype).eval()
    state = model.state_dict()
    for key, value in list(state.items()):
        if ".attn.wk." in key or ".attn.wv." in key:
            heads = [value[h * d : (h + 1) * d] for h in range(old)]
            state[key] = torch.cat(
                [sum(heads[j * r + m] for m in range(r)) / r for j in range(n_kv_heads)]
            )
    ref.load_state_dict(state)
    return ref


@torch.no_grad()
def test_mha_expansion_of_smollm2_leaves_logits_unchanged(smollm2):
    model, tokenizer = smollm2
    before, config = snapshot(model), model.config
    ids = corpus_tokens(tokenizer, 32).unsqueeze(0)
    mha = expand_to_mha(model)
    assert mha.config.num_key_value_heads == mha.config.num_attention_heads == 9
    assert all(b.attn.wk.out_features == 9 * 64 for b in mha.blocks)
    want, got = model(ids), mha(ids)
    # A few float32 ulps at the logits' magnitude: far below float32's own error against a
    # float64 run of this model (~1e-4); on CPU the two are bitwise equal.
    tol = 4 * F32_EPS * want.abs().max().item()
    assert (got - want).abs().max().item() <= tol
    same = pool_kv_heads(model, 3)  # pooling each head with itself: the identity
    assert_same_weights(same, model)
    assert same.config == config  # same weights and config: the same logits
    assert_unchanged(model, before, config)


@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_mha_expansion_and_identity_pooling_are_exact_in_float64(bias):
    model = tiny(attention_bias=bias)
    ids = ids_for(model, 2, 23, seed=1)
    mha = expand_to_mha(model)
    assert (mha(ids) - model(ids)).abs().max() < 1e-12
    assert isinstance(mha.blocks[0].attn, Attention) and mha.blocks[0].attn.n_kv_heads == 9
    assert torch.equal(pool_kv_heads(model, 3)(ids), model(ids))


@pytest.mark.parametrize(
    ("heads", "kv_heads", "new"), [(9, 3, 1), (12, 6, 2), (12, 6, 3), (12, 12, 4)], ids=str
)
@pytest.mark.parametrize("bias", [False, True])
@torch.no_grad()
def test_pooling_equals_a_hand_pooled_model(heads, kv_heads, new, bias):
    model = tiny(
        seed=heads + new,
        hidden_size=heads * 6,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attention_bias=bias,
    )
    before, config = snapshot(model), model.config
    pooled = pool_kv_heads(model, new)
    assert pooled.config.num_key_value_heads == new
    assert all(b.attn.n_kv_heads == new for b in pooled.blocks)
    ids = ids_for(model, 2, 19, seed=2)
    got = pooled(ids)
    assert (got - hand_pooled(model, new)(ids)).abs().max() < 1e-12
    assert (got - model(ids)).abs().max() > 1e-3  # pooling K/V heads of random weights is lossy
    assert_unchanged(model, before, config)


@pytest.mark.parametrize(
    "convert", [lambda m: pool_kv_heads(m, 1), expand_to_mha], ids=["mqa", "mha"]
)
@torch.no_grad()
def test_converted_models_decode_through_a_cache_as_their_full_forward(convert):
    model = convert(tiny(seed=5, attention_bias=True))
    ids = ids_for(model, 2, 20, seed=3)
    full = model(ids)
    cache, pieces, start = model.new_cache(2, initial_len=8), [], 0
    for n in (10, 4, 6):
        pieces.append(model(ids[:, start : start + n], cache=cache))
        start += n
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-12
    assert cache.kv_heads == model.config.num_key_value_heads


@torch.no_grad()
def test_kv_bytes_per_token_equals_a_real_cache_per_token():
    model = tiny().float()
    for m, kv_heads in ((model, 3), (pool_kv_heads(model, 1), 1), (expand_to_mha(model), 9)):
        cache = m.new_cache(1, initial_len=13)
        assert cache.nbytes == 13 * kv_bytes_per_token(m)
        assert kv_bytes_per_token(m) == 3 * 2 * kv_heads * 6 * 4  # layers, K+V, heads, dim, f32
    assert kv_bytes_per_token(model, torch.bfloat16) * 2 == kv_bytes_per_token(model)
    assert kv_bytes_per_token(model.double()) == 2 * kv_bytes_per_token(model.float())


@pytest.mark.parametrize(
    ("n_kv_heads", "match"),
    [
        (0, "n_kv_heads must be an integer >= 1, got 0"),
        (True, "n_kv_heads must be an integer >= 1, got True"),
        (2.0, "n_kv_heads must be an integer >= 1"),
        (2, r"must divide the current number of K/V heads \(3\).*got 2, allowed: \[1, 3\]"),
        (9, r"got 9, allowed: \[1, 3\]; use expand_to_mha"),
    ],
)
def test_pool_rejects_head_counts_that_do_not_merge_whole_groups(n_kv_heads, match):
    with pytest.raises(ValueError, match=match):
        pool_kv_heads(tiny(), n_kv_heads)


def test_conversions_reject_models_without_kv_head_attention():
    class Other(torch.nn.Module):
        def forward(self, x, ctx):
            return x

    odd = Transformer(tiny().config, attention=lambda config, i: Other())
    for convert in (lambda m: pool_kv_heads(m, 1), expand_to_mha, kv_bytes_per_token):
        with pytest.raises(TypeError, match="layer 0 attention is Other"):
            convert(odd)
        with pytest.raises(TypeError, match="model must be an attnkit Transformer, got Linear"):
            convert(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="dtype must be a torch.dtype or None, got 'bf16'"):
        kv_bytes_per_token(tiny(), "bf16")
