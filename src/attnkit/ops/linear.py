"""Linear attention: a kernel feature map in place of softmax, in three equal forms.

Softmax attention weighs key j for query i by exp(q_i·k_j). Linear attention replaces it
with φ(q_i)·φ(k_j) for a feature map φ, so that (Katharopoulos et al., "Transformers are
RNNs", 2020)

    out_i = φ(q_i)·S_i / (φ(q_i)·z_i + eps),   S_i = Σ_{j<=i} φ(k_j) v_jᵀ,   z_i = Σ_{j<=i} φ(k_j)

and the pair (S, z) is a fixed-size recurrent state. Three forms compute the same numbers:

- `parallel`:  the masked (n, n) matrix φ(Q)φ(K)ᵀ, row-normalised. O(N²·d); the oracle.
- `chunkwise`: chunks of C tokens; inside a chunk the masked matrix, across chunks the
  state (Yang et al., "Gated Linear Attention", 2023, §2). O(N·C·d + N·d²).
- `recurrent`: one token at a time through the state. O(d²) time and memory per token;
  this is how a cache decodes.

Shapes: q `(batch, heads, n, d)`, k `(batch, kv_heads, n, d)`, v `(batch, kv_heads, n, dv)`
with `heads % kv_heads == 0` (query head i reads KV head i // (heads // kv_heads), as GQA).
The state is S `(batch, kv_heads, feat, dv)` and z `(batch, kv_heads, feat)`, where
`feat = feature_dim(feature_map, d)`. Half-precision inputs are computed in float32 (the
state is a running sum and would lose its small terms in 10 bits); the output comes back in
the input dtype, the state in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.ops.problem import check_qkv


class LinearState(NamedTuple):
    """Σ φ(k) vᵀ `(batch, kv_heads, feat, dv)` and Σ φ(k) `(batch, kv_heads, feat)`."""

    S: Tensor
    z: Tensor


def _elu_plus_one(x: Tensor) -> Tensor:
    y = F.elu(x)
    # in place when no gradient flows (ELU's backward reads its output)
    return y + 1 if y.requires_grad else y.add_(1)


def _taylor(x: Tensor) -> Tensor:
    """[1, x', x'_i x'_j (i < j), x'_i² / √2] with x' = x / d^(1/4).

    Then φ(q)·φ(k) = 1 + s + s²/2 with s = q·k / √d: the second-order Taylor expansion of
    softmax's exp(s) ("Based", Arora et al., 2024; Zhang et al., "The Hedgehog & the
    Porcupine", 2024). It is >= 1/2 for every s, so the normaliser never vanishes. Keeping
    each unordered pair i <= j once (not the full outer product) halves the features.
    """
    d = x.shape[-1]
    x = x * d**-0.25
    i, j = torch.triu_indices(d, d, device=x.device)
    weight = torch.where(i == j, x.new_tensor(0.5**0.5), x.new_tensor(1.0))
    pairs = x[..., i] * x[..., j] * weight
    return torch.cat([torch.ones_like(x[..., :1]), x, pairs], dim=-1)


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {
    "elu": _elu_plus_one,  # elu(x) + 1 (Katharopoulos et al.): positive, d features
    "relu": torch.relu,  # d features; a row can be all zero, which `eps` guards
    "taylor": _taylor,  # 1 + d + d(d+1)/2 features, kernel 1 + s + s²/2
}
FORMS = ("parallel", "chunkwise", "recurrent")
# The chunkwise form holds the state before each chunk of a group of chunks: about this
# many elements (64 MiB of float32) per group, in each of three tensors (each chunk's own
# sum, their prefix sums, the states before each chunk).
PREFIX_STATE_ELEMENTS = 2**24


def _check_feature_map(feature_map: object) -> str:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(
            f"feature_map must be one of {', '.join(map(repr, FEATURE_MAPS))}, got {feature_map!r}"
        )
    return feature_map


def feature_dim(feature_map: str, head_dim: int) -> int:
    """Number of features φ produces from a `head_dim`-sized q or k (the state's `feat`)."""
    _check_feature_map(feature_map)
    check_positive_int("head_dim", head_dim)
    return 1 + head_dim + head_dim * (head_dim + 1) // 2 if feature_map == "taylor" else head_dim


def apply_feature_map(x: Tensor, feature_map: str) -> Tensor:
    """φ(x) over the last dim: `(..., d)` -> `(..., feature_dim(feature_map, d))`."""
    return FEATURE_MAPS[_check_feature_map(feature_map)](x)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map: str = "elu",
    causal: bool = True,
    form: str = "chunkwise",
    chunk_size: int = 64,
    state: tuple[Tensor, Tensor] | None = None,
    return_state: bool = False,
    eps: float = 1e-6,
) -> Tensor | tuple[Tensor, LinearState]:
    """Linear attention of q over k, v; `(batch, heads, n_q, dv)` in q's dtype.

    Causal attention needs `n_q == n_k` (query i is token i of the same sequence) and puts
    the keys summarised by `state` (default: none) before all of them, so splitting a
    sequence anywhere and carrying the state across is exact. Non-causal attention lets
    every query see `state`'s keys and all of k; `form="chunkwise"` then builds the state
    once (O(N·d²)) and the recurrent form is refused. `eps` is added to every normaliser
    φ(q)·z: it keeps rows whose features are all zero (possible with `relu`) at output 0
    instead of NaN, at a relative bias of about eps / (φ(q)·z) elsewhere.
    With `return_state`, returns `(out, LinearState(S, z))` after the last key as well.
    """
    _check_inputs(q, k, v)
    _check_feature_map(feature_map)
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
    check_positive_int("chunk_size", chunk_size)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"causal linear attention needs as many queries as keys (query i is token i), got "
            f"{q.shape[2]} queries and {k.shape[2]} keys; pass causal=False for cross-attention"
        )
    if not causal and form == "recurrent":
        raise ValueError(
            "form='recurrent' is causal by construction (each step sees only the keys so far); "
            "use form='parallel' or 'chunkwise' with causal=False"
        )

    b, heads, n, _ = q.shape
    kv_heads, dv = k.shape[1], v.shape[-1]
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    # Fold query groups: (b, H, n, d) -> (b, kv_heads, group, n, feat); K/V are not repeated.
    fq = apply_feature_map(q.to(compute), feature_map)
    fq = fq.view(b, kv_heads, heads // kv_heads, n, fq.shape[-1])
    fk = apply_feature_map(k.to(compute), feature_map)
    v = v.to(compute)
    S, z = _initial_state(state, b, kv_heads, fk.shape[-1], dv, compute, q.device)

    if form == "parallel":
        num, den, S, z = _parallel(fq, fk, v, S, z, causal)
    elif not causal:  # chunkwise, non-causal: one state over every key
        S, z = S + fk.transpose(-1, -2) @ v, z + fk.sum(2)
        num, den = fq @ S.unsqueeze(2), fq @ z.unsqueeze(2).unsqueeze(-1)
    elif form == "chunkwise":
        num, den, S, z = _chunkwise(fq, fk, v, S, z, chunk_size, carried=state is not None)
    else:
        num, den, S, z = _recurrent(fq, fk, v, S, z)
    out = (num / (den + eps)).reshape(b, heads, n, dv).to(q.dtype)
    return (out, LinearState(S, z)) if return_state else out


def _parallel(fq: Tensor, fk: Tensor, v: Tensor, S: Tensor, z: Tensor, causal: bool):
    """The quadratic form: the whole (n_q, n_k) kernel matrix at once, masked if causal."""
    scores = fq @ fk.unsqueeze(2).transpose(-1, -2)  # (b, kv_heads, group, n_q, n_k)
    if causal:
        n = scores.shape[-1]
        scores = scores * torch.ones(n, n, dtype=torch.bool, device=fq.device).tril()
    num = fq @ S.unsqueeze(2) + scores @ v.unsqueeze(2)
    den = fq @ z.unsqueeze(2).unsqueeze(-1) + scores.sum(-1, keepdim=True)
    return num, den, S + fk.transpose(-1, -2) @ v, z + fk.sum(2)


def _chunkwise(fq: Tensor, fk: Tensor, v: Tensor, S: Tensor, z: Tensor, chunk: int, carried: bool):
    """Causal: a masked matrix inside each chunk, the state of all earlier chunks across.

    Chunks are batched: every chunk's own K^T V comes from one matmul and an exclusive
    prefix sum over chunks gives the state before each one, so there is no per-chunk
    Python loop. Chunks go in groups that bound the prefix states' memory (the Taylor map
    has ~d²/2 features), carrying the state from group to group. The normaliser rides along
    as one more value column: with [v | 1] the same matmuls give the state and its key sum
    [S | z], and each row's numerator and denominator (one pass over the prefix states,
    not two). `carried`: S and z came from the caller (else they are zeros, added to
    nothing; a zero state that wants gradients is still added, so they reach it).
    """
    n = fk.shape[2]
    if n == 0:
        return _empty(fq, v, S, z)
    b, kv_heads, group, _, feat = fq.shape
    dv = v.shape[-1]
    pad = -n % chunk  # zero features add nothing to any state; padded rows are cut below
    if pad:
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)) for t in (fq, fk, v))
    n_chunks = (n + pad) // chunk
    v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
    state = torch.cat([S, z.unsqueeze(-1)], -1)  # (b, kv_heads, feat, dv + 1)
    q_c = fq.view(b, kv_heads, group, n_chunks, chunk, feat)
    k_c = fk.view(b, kv_heads, n_chunks, chunk, feat)
    v_c = v1.view(b, kv_heads, n_chunks, chunk, dv + 1)
    per_group = max(1, PREFIX_STATE_ELEMENTS // max(b * kv_heads * feat * (dv + 1), 1))
    outs = []
    for first in range(0, n_chunks, per_group):
        part = slice(first, first + per_group)
        q, k, vv = q_c[:, :, :, part], k_c[:, :, part], v_c[:, :, part]
        kv = k.transpose(-1, -2) @ vv  # (b, kv_heads, m, feat, dv + 1): each chunk's own sum
        prefix = kv[:, :, :-1].cumsum(2)  # the state before each chunk but the first
        if first > 0 or carried:
            prefix += state.unsqueeze(2)
        before = torch.cat([state.unsqueeze(2), prefix], 2)
        scores = (q @ k.unsqueeze(2).transpose(-1, -2)).tril_()  # (b, kv_heads, g, m, c, c)
        out = q @ before.unsqueeze(2)
        out += scores @ vv.unsqueeze(2)
        outs.append(out)
        state = before[:, :, -1] + kv[:, :, -1]
    out = torch.cat(outs, dim=3).flatten(3, 4)[:, :, :, :n]
    return out[..., :dv], out[..., dv:], state[..., :dv].contiguous(), state[..., dv].contiguous()


def _recurrent(fq: Tensor, fk: Tensor, v: Tensor, S: Tensor, z: Tensor):
    """Causal, one token at a time: add φ(k_t) v_tᵀ to the state, then read it with φ(q_t)."""
    if fk.shape[2] == 0:
        return _empty(fq, v, S, z)
    nums, dens = [], []
    for t in range(fk.shape[2]):
        k_t = fk[:, :, t]  # (b, kv_heads, feat)
        S = S + k_t.unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        z = z + k_t
        q_t = fq[:, :, :, t]  # (b, kv_heads, group, feat)
        nums.append(q_t @ S)
        dens.append(q_t @ z.unsqueeze(-1))
    return torch.stack(nums, dim=3), torch.stack(dens, dim=3), S, z


def _empty(fq: Tensor, v: Tensor, S: Tensor, z: Tensor):
    """No tokens: empty numerators and denominators, the state as it was."""
    return fq.new_zeros(*fq.shape[:-1], v.shape[-1]), fq.new_zeros(*fq.shape[:-1], 1), S, z


def _initial_state(state, b, kv_heads, feat, dv, dtype, device) -> LinearState:
    """The given state checked against the shapes it must have, or zeros."""
    if state is None:
        return LinearState(
            torch.zeros(b, kv_heads, feat, dv, dtype=dtype, device=device),
            torch.zeros(b, kv_heads, feat, dtype=dtype, device=device),
        )
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"state must be a pair (S, z) of tensors, got {type(state).__name__}")
    expected = {
        "S": ((b, kv_heads, feat, dv), "(batch, kv_heads, feat, dv)"),
        "z": ((b, kv_heads, feat), "(batch, kv_heads, feat)"),
    }
    for (name, (shape, legend)), t in zip(expected.items(), state, strict=True):
        if not isinstance(t, Tensor):
            raise TypeError(f"state {name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"state {name} must be {legend} = {shape} for these inputs, got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"state {name} is on {t.device} but q is on {device}")
    return LinearState(state[0].to(dtype), state[1].to(dtype))


def _floating(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    check_qkv(q, k, v, _floating)
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"k (heads, keys) = {tuple(k.shape[1:3])} and v = {tuple(v.shape[1:3])} must match"
        )
    if q.shape[1] == 0 or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q has {q.shape[1]} heads, which is not a multiple of the {k.shape[1]} KV heads of "
            "k and v (GQA needs heads % kv_heads == 0)"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q head_dim {q.shape[3]} differs from k head_dim {k.shape[3]}; they must match "
            "(only v's head_dim may differ)"
        )
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"head_dim must be >= 1, got q {q.shape[3]} and v {v.shape[3]}")
