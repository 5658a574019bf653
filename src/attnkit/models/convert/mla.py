"""GQA/MHA -> multi-head latent attention (MLA) on a loaded model, by low-rank factorisation.

Keys are split into RoPE dims, kept exactly as MLA's decoupled RoPE key, and the rest,
which lose their rotation and are compressed together with the values into one latent of
`kv_rank` values by PCA of the stacked projections [W_k_nope; W_v] (TransMLA, Meng et al.
2025, arXiv:2502.07864; MHA2MLA, Ji et al. 2025, arXiv:2502.14837). With every rotary dim
kept and `kv_rank` at its maximum the converted model computes the same function.

Which rotary dims stay rotary: each candidate's importance is the product of its query and
key norms (MHA2MLA's "2-norm" rule) times how much its rotation moves a score at distances
d up to `rope_context`, `mean_d |2 sin(theta_i d / 2)|`: the lowest frequencies barely
rotate, so dropping their rotation costs little. (SmolLM2, 512 corpus tokens, 16 RoPE dims
per KV head at full rank, 17.5 unconverted: perplexity 47 with this rule at rope_context
256, 100 keeping the highest frequencies, 247 ranking by norms alone.)

With one shared RoPE key (`rope_heads=1`, DeepSeek's layout) the KV heads are first mixed
per frequency by the PCA of their keys, which commutes with RoPE (both act on the same 2-D
pair), so the energy gathers in few mixed components (TransMLA's RoRoPE). With
`rope_heads = num_key_value_heads` each KV head keeps its own RoPE key and the same pairs
are kept in every head.

`calibration` (token ids) replaces the weights-only statistics with those of the layers'
real inputs: PCA of X·Wᵀ instead of W finds the subspace the activations actually use. It
is what makes compression work at all: SmolLM2 with 64 RoPE dims at kv_rank 128 reaches
perplexity 20.6 calibrated on 1024 corpus tokens, 2647 from the weights alone (11.9
unconverted, on 2048 other tokens).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.layers.attention import Attention
from attnkit.layers.latent import MODES, LatentAttention
from attnkit.models.llama import Transformer


def _attention_layers(model: Transformer) -> list[Attention]:
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be an attnkit Transformer, got {type(model).__name__}")
    layers = [block.attn for block in model.blocks]
    for i, attn in enumerate(layers):
        if type(attn) is not Attention:
            raise TypeError(
                f"layer {i} attention is {type(attn).__name__}; to_mla converts "
                f"attnkit.layers.attention.Attention layers (GQA/MHA K/V projections)"
            )
        if getattr(attn, "pattern", None) is not None:
            raise ValueError(
                f"layer {i} attends through a window or pattern ({attn.pattern!r}); to_mla "
                "converts full-attention layers only"
            )
    return layers


def rope_dim_range(model: Transformer, rope_heads: int = 1) -> tuple[int, int]:
    """Smallest and largest `rope_dim` (per RoPE head) `to_mla` accepts for `rope_heads`."""
    config = model.config
    if rope_heads not in (1, config.num_key_value_heads):
        raise ValueError(
            f"rope_heads must be 1 (one RoPE key shared by all heads, DeepSeek) or "
            f"num_key_value_heads={config.num_key_value_heads} (one per KV head), "
            f"got {rope_heads!r}"
        )
    return 2, config.head_dim * config.num_key_value_heads // rope_heads


def max_kv_rank(model: Transformer, *, rope_dim: int | None = None, rope_heads: int = 1) -> int:
    """The largest useful `kv_rank` for these RoPE settings: the rank of [W_k_nope; W_v].

    At this rank the latent loses nothing; the only change left is the rotation removed
    from the dims not kept as RoPE (none when `rope_dim` is None, the maximum).
    """
    config = model.config
    low, high = rope_dim_range(model, rope_heads)
    rope_dim = high if rope_dim is None else rope_dim
    _check_rope_dim(rope_dim, low, high)
    kept = rope_heads * rope_dim  # rotary values cached per token
    rows = config.num_key_value_heads * 2 * config.head_dim - kept  # K_nope rows + V rows
    inputs = config.hidden_size + int(config.attention_bias)
    return min(rows, inputs)


def _check_rope_dim(rope_dim: object, low: int, high: int) -> None:
    if (
        isinstance(rope_dim, bool)
        or not isinstance(rope_dim, int)
        or not low <= rope_dim <= high
        or rope_dim % 2
    ):
        raise ValueError(f"rope_dim must be an even integer in [{low}, {high}], got {rope_dim!r}")


@torch.no_grad()
def to_mla(
    model: Transformer,
    kv_rank: int,
    *,
    rope_dim: int | None = None,
    rope_heads: int = 1,
    calibration: Tensor | None = None,
    rope_context: int = 1024,
    mode: str = "auto",
) -> Transformer:
    """A copy of `model` whose attention layers are `LatentAttention` with this `kv_rank`.

    `rope_dim`: RoPE dims per RoPE head (default: all, `head_dim * num_key_value_heads /
    rope_heads`, which keeps positions exact); `rope_heads`: 1 or num_key_value_heads.
    Each layer then caches `kv_rank + rope_heads * rope_dim` values per token instead of
    `2 * num_key_value_heads * head_dim`. `calibration`: token ids `(seq,)` or `(batch,
    seq)` whose activations set the statistics (default: the weights alone, fine at full
    rank but poor below it).
    `rope_context`: the distances (tokens) over which dropped rotations are judged; about
    the context the model will serve. The input model is not changed.
    """
    layers = _attention_layers(model)
    config = model.config
    low, high = rope_dim_range(model, rope_heads)
    rope_dim = high if rope_dim is None else rope_dim
    _check_rope_dim(rope_dim, low, high)
    limit = max_kv_rank(model, rope_dim=rope_dim, rope_heads=rope_heads)
    if isinstance(kv_rank, bool) or not isinstance(kv_rank, int) or not 1 <= kv_rank <= limit:
        raise ValueError(
            f"kv_rank must be an integer in [1, {limit}] (the rank of [W_k_nope; W_v] with "
            f"rope_dim={rope_dim}, rope_heads={rope_heads}), got {kv_rank!r}"
        )
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_positive_int("rope_context", rope_context)
    grams = _input_grams(model, calibration)
    weight = _rotation_weights(model, rope_context)
    converted = copy.deepcopy(model)
    for i, attn in enumerate(layers):
        new = _convert_layer(attn, grams[i], kv_rank, rope_dim, rope_heads, weight, config)
        new.mode = mode
        new.train(attn.training)
        converted.blocks[i].attn = new
    return converted


def mla_kv_bytes_per_token(model: Transformer, dtype: torch.dtype | None = None) -> int:
    """Bytes all layers cache per token: latent + RoPE key for MLA layers, K and V for GQA."""
    dtype = dtype or next(model.parameters()).dtype
    size = torch.empty((), dtype=dtype).element_size()
    values = 0
    for i, block in enumerate(model.blocks):
        attn = block.attn
        if isinstance(attn, LatentAttention):
            values += attn.cache_values_per_token
        elif isinstance(attn, Attention):
            values += 2 * attn.n_kv_heads * attn.head_dim
        else:
            raise TypeError(f"layer {i}: no KV size known for {type(attn).__name__}")
    return values * size


def _input_grams(model: Transformer, calibration: Tensor | None) -> list[Tensor]:
    """Per layer, E[x̃ x̃ᵀ] of the attention inputs x̃ = [x, 1] (identity without data)."""
    d = model.config.hidden_size
    if calibration is None:
        return [torch.eye(d + 1, dtype=torch.float64)] * len(model.blocks)
    ids = _check_calibration(model, calibration)
    grams: list[Tensor] = [torch.zeros(d + 1, d + 1, dtype=torch.float64) for _ in model.blocks]

    def hook(index: int):
        def record(module, args) -> None:
            x = args[0].detach().reshape(-1, d).to(device="cpu", dtype=torch.float64)
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            grams[index] += x.T @ x / len(x)

        return record

    handles = [b.attn.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.blocks)]
    try:
        model(ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return grams


def _check_calibration(model: Transformer, ids: object) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"calibration must be a tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"calibration must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise ValueError(
            f"calibration must be non-empty (seq,) or (batch, seq), got shape {tuple(ids.shape)}"
        )
    lo, hi, vocab = int(ids.min()), int(ids.max()), model.config.vocab_size
    if lo < 0 or hi >= vocab:
        raise ValueError(f"calibration ids must lie in [0, {vocab}), got [{lo}, {hi}]")
    return ids.view(1, -1) if ids.dim() == 1 else ids


def _rotation_weights(model: Transformer, context: int) -> Tensor:
    """Per rotary pair, mean over distances d in [1, context] of |2 sin(theta_i d / 2)|.

    That is how far RoPE moves a unit score at distance d: what dropping the pair's
    rotation costs, on average.
    """
    theta = model.rope.inv_freq.double().cpu()
    distances = torch.arange(1, context + 1, dtype=torch.float64)
    return (2 * torch.sin(theta[:, None] * distances[None] / 2)).abs().mean(dim=1)


def _pairs(w: Tensor, heads: int, interleaved: bool) -> Tensor:
    """(heads·head_dim, n) rows -> (heads, pairs, 2, n): rotary pair i, component c."""
    w = w.view(heads, -1, w.shape[-1])
    if interleaved:  # dims 2i, 2i+1
        return w.view(heads, -1, 2, w.shape[-1])
    return w.view(heads, 2, -1, w.shape[-1]).transpose(1, 2)  # dims i, i + pairs


def _layout(rows: Tensor, interleaved: bool) -> Tensor:
    """(..., slots, 2, n) -> (..., 2·slots, n) in the RoPE layout `apply_rotary` expects."""
    if interleaved:
        return rows.flatten(-3, -2)
    return rows.transpose(-3, -2).flatten(-3, -2)


def _augmented(linear: torch.nn.Linear) -> Tensor:
    """[W, b] in float64 (b = 0 without a bias): biases transform like one more input."""
    w = linear.weight.detach().double().cpu()
    b = linear.bias.detach().double().cpu() if linear.bias is not None else w.new_zeros(len(w))
    return torch.cat([w, b[:, None]], dim=1)


def _energy(rows: Tensor, gram: Tensor) -> Tensor:
    """E‖rows·x̃‖² over the last two dims (pair components), for every leading index."""
    return ((rows @ gram) * rows).sum((-2, -1))


def _convert_layer(
    attn: Attention,
    gram: Tensor,
    kv_rank: int,
    rope_dim: int,
    rope_heads: int,
    weight: Tensor,
    config,
) -> LatentAttention:
    h, g, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    group, interleaved, d = h // g, config.rope_interleaved, config.hidden_size
    q = _pairs(_augmented(attn.wq), h, interleaved)  # (H, P, 2, d+1)
    k = _pairs(_augmented(attn.wk), g, interleaved)  # (G, P, 2, d+1)
    v = _augmented(attn.wv)  # (G·hd, d+1)
    n_pairs = q.shape[1]
    q_energy = _energy(q, gram)  # (H, P)
    if rope_heads == 1:
        # Mix KV heads per pair by the PCA of their keys: u_j·k_i for component j.
        cov = torch.einsum("gpcm,fpcm->pgf", k @ gram, k)  # (P, G, G)
        k_energy, mix = torch.linalg.eigh(cov)  # ascending; mix[p, g, j]
        k_energy, mix = k_energy.flip(-1).clamp(min=0), mix.flip(-1)
    else:
        k_energy = _energy(k, gram).T  # (P, G): head g is its own component
        mix = torch.eye(g, dtype=k.dtype).expand(n_pairs, g, g)
    owner = torch.arange(h) // group
    # A query head's share of component j is mix[p, g(h), j]² of its energy.
    q_share = torch.einsum("hp,phj->pj", q_energy, mix[:, owner, :] ** 2)  # (P, G)
    score = (q_share * k_energy).sqrt() * weight[:n_pairs, None]
    if rope_heads == 1:
        ranked = score.flatten().argsort(descending=True)[: rope_dim // 2].sort().values
        slots = [(int(s) // g, int(s) % g) for s in ranked]  # (pair, component)
    else:
        pairs = score.sum(1).argsort(descending=True)[: rope_dim // 2].sort().values
        slots = [(int(p), None) for p in pairs]
    kept = torch.zeros(n_pairs, g, dtype=torch.bool)
    for p, j in slots:
        kept[p, slice(None) if j is None else j] = True
    rope_pairs = [p for p, _ in slots]

    # RoPE rows: shared key u_j·k_p (query h: mix[p, g(h), j]·q_h,p), or each head's own.
    if rope_heads == 1:
        k_rope = torch.stack([torch.einsum("g,gcn->cn", mix[p, :, j], k[:, p]) for p, j in slots])
        k_rope = _layout(k_rope, interleaved)[None]  # (1, rope_dim, d+1)
        q_rope = torch.stack([mix[p, owner, j, None, None] * q[:, p] for p, j in slots], dim=1)
    else:
        k_rope = _layout(k[:, rope_pairs], interleaved)  # (G, rope_dim, d+1)
        q_rope = q[:, rope_pairs]
    q_rope = _layout(q_rope, interleaved)  # (H, rope_dim, d+1)

    # No-RoPE rows: per KV head, each pair's key projected onto its dropped components.
    nope = [p for p in range(n_pairs) if not kept[p].all()]
    dropped = mix[nope] * (~kept[nope]).to(mix.dtype)[:, None, :]  # (N, G, G)
    projector = dropped @ mix[nope].transpose(1, 2)  # U_D U_Dᵀ per pair
    k_nope = torch.einsum("pgf,fpcn->gpcn", projector, k[:, nope]).flatten(1, 2)  # (G, 2N, d+1)
    q_nope = q[:, nope].flatten(1, 2)  # (H, 2N, d+1)

    # Joint PCA of [α·K_nope; V], α balancing their energies (TransMLA's BKV).
    k_rows, v_rows = k_nope.flatten(0, 1), v
    k_total, v_total = float(_energy(k_rows[None], gram)), float(_energy(v_rows[None], gram))
    alpha = math.sqrt(v_total / k_total) if k_total > 0 else 1.0
    stacked = torch.cat([alpha * k_rows, v_rows])
    _, vectors = torch.linalg.eigh(stacked @ gram @ stacked.T)
    basis = vectors.flip(-1)[:, :kv_rank]  # (rows, kv_rank), orthonormal
    down = basis.T @ stacked  # (kv_rank, d+1): the latent
    up_k = (basis[: len(k_rows)] / alpha).view(g, -1, kv_rank)[owner]  # (H, 2N, r)
    up_v = basis[len(k_rows) :].view(g, hd, kv_rank)[owner]  # (H, hd, r)

    bias = attn.wq.bias is not None or attn.wk.bias is not None or attn.wv.bias is not None
    layer = LatentAttention(
        attn.layer_idx,
        d,
        h,
        kv_rank=kv_rank,
        rope_dim=rope_dim,
        nope_dim=2 * len(nope),
        v_head_dim=hd,
        rope_heads=rope_heads,
        rope_pairs=rope_pairs,
        kv_norm=False,
        scale=1.0 / math.sqrt(hd),
        qkv_bias=bias,
        out_bias=attn.wo.bias is not None,
        backend=attn.backend,
    )
    wq = torch.cat([q_nope, q_rope], dim=1).flatten(0, 1)
    wkv_a = torch.cat([down, k_rope.flatten(0, 1)])
    wkv_b = torch.cat([up_k, up_v], dim=1).flatten(0, 1)
    to = dict(dtype=attn.wq.weight.dtype, device=attn.wq.weight.device)
    layer.to(**to)
    for linear, rows in ((layer.wq, wq), (layer.wkv_a, wkv_a)):
        linear.weight.copy_(rows[:, :d])
        if linear.bias is not None:
            linear.bias.copy_(rows[:, d])
    layer.wkv_b.weight.copy_(wkv_b)
    layer.wo.load_state_dict(attn.wo.state_dict())
    return layer
