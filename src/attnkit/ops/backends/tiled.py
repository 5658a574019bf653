"""FlashAttention's algorithm in plain PyTorch: tiles, online softmax, block skipping.

Dao et al. 2022 (FlashAttention) and Dao 2023 (FlashAttention-2): for each tile of
queries, walk the tiles of keys keeping a running row maximum `m`, a running sum of
exponentials `l` and an unnormalised output `acc`; rescale both when the maximum grows.
Extra memory is O(N): one score tile at a time, never the N×N matrix. The mask's block
summary says which tiles to skip (empty), which to compute without a mask (full) and
which need the mask evaluated on the tile (partial).

GQA is handled by folding each KV head's query group into the tile's rows, so one matmul
per KV head serves the whole group and K/V are never repeated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.ops.backends.base import Backend
from attnkit.ops.backends.common import compute_dtype
from attnkit.ops.problem import AttentionProblem


class TiledBackend(Backend):
    """Online-softmax attention over `block_q x block_k` tiles; returns lse."""

    name = "tiled"

    def __init__(self, block_q: int = 128, block_k: int = 128, max_span: int = 2048) -> None:
        for arg, value in (("block_q", block_q), ("block_k", block_k), ("max_span", max_span)):
            check_positive_int(arg, value)
        # block_k is the granularity of skipping; runs of key tiles of the same kind are
        # merged into one matmul of up to max(max_span, block_k) keys.
        self.block_q, self.block_k, self.max_span = block_q, block_k, max(max_span, block_k)

    def run(self, p: AttentionProblem) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(p.q.dtype)
        b, kv_heads, group = p.batch, p.kv_heads, p.group
        # (B, H_kv, G, n_q, d): query head h = kv_head * G + g uses KV head h // G.
        q = (p.q.to(dtype) * p.scale).view(b, kv_heads, group, p.n_q, p.q.shape[-1])
        k, v = p.k.to(dtype), p.v.to(dtype)
        tiles = _TilePlan(p, self.block_q, self.block_k, self.max_span)
        out = lse = None
        for qi, (q0, q1) in enumerate(tiles.q_ranges):
            q_tile = q[:, :, :, q0:q1].reshape(b, kv_heads, group * (q1 - q0), q.shape[-1])
            o, s = _attend_tile_row(p, q_tile, k, v, tiles, qi, group)
            o = o.view(b, kv_heads, group, q1 - q0, v.shape[-1])
            s = s.view(b, kv_heads, group, q1 - q0)
            if len(tiles.q_ranges) == 1:  # the whole answer: no copy
                out, lse = o, s
                break
            if out is None:  # made from a result, not torch.empty: batched as it is under vmap
                out = o.new_empty(b, kv_heads, group, p.n_q, v.shape[-1])
                lse = s.new_empty(b, kv_heads, group, p.n_q)
            out[:, :, :, q0:q1] = o
            lse[:, :, :, q0:q1] = s

        out = out.reshape(b, p.heads, p.n_q, v.shape[-1]).to(p.q.dtype)
        return out, lse.reshape(b, p.heads, p.n_q)  # float32 (float64 for float64 inputs)


class _TilePlan:
    """Tile ranges and, per (query tile, key tile), whether to skip, mask or go unmasked."""

    def __init__(self, p: AttentionProblem, block_q: int, block_k: int, max_span: int) -> None:
        self.max_span = max_span
        self.q_ranges = [(s, min(s + block_q, p.n_q)) for s in range(0, p.n_q, block_q)]
        self.k_ranges = [(s, min(s + block_k, p.n_k)) for s in range(0, p.n_k, block_k)]
        if p.mask is None:
            self.nonempty = self.full = None
            return
        summary = p.mask.block_summary(
            p.n_q, p.n_k, block_q, block_k, p.q_offset, device=p.q.device
        )
        # A tile is skipped only if it is empty for every sequence in the batch, and goes
        # unmasked only if it is full for every one; per-batch detail lives in `allowed`.
        self.nonempty = summary.nonempty.any(0).tolist()
        self.full = summary.full.all(0).tolist()

    def key_tiles(self, qi: int) -> list[tuple[int, int, bool]]:
        """(k0, k1, needs_mask) spans query tile `qi` must visit, adjacent tiles merged."""
        if self.nonempty is None:
            tiles = [(k0, k1, False) for k0, k1 in self.k_ranges]
        else:
            tiles = [
                (k0, k1, not self.full[qi][ki])
                for ki, (k0, k1) in enumerate(self.k_ranges)
                if self.nonempty[qi][ki]
            ]
        spans: list[tuple[int, int, bool]] = []
        for k0, k1, masked in tiles:
            if spans:
                s0, s1, s_masked = spans[-1]
                if s1 == k0 and s_masked == masked and k1 - s0 <= self.max_span:
                    spans[-1] = (s0, k1, masked)
                    continue
            spans.append((k0, k1, masked))
        return spans


def _attend_tile_row(
    p: AttentionProblem, q_tile: Tensor, k: Tensor, v: Tensor, tiles: _TilePlan, qi: int, group: int
) -> tuple[Tensor, Tensor]:
    """Online softmax of one query tile (rows folded as G·tq) over its key tiles."""
    b, kv_heads, rows, _ = q_tile.shape
    q0, q1 = tiles.q_ranges[qi]
    row_max = q_tile.new_full((b, kv_heads, rows), -math.inf)
    row_sum = q_tile.new_zeros((b, kv_heads, rows))
    acc = q_tile.new_zeros((b, kv_heads, rows, v.shape[-1]))

    for k0, k1, needs_mask in tiles.key_tiles(qi):
        k_tile, v_tile = k[:, :, k0:k1], v[:, :, k0:k1]
        scores = q_tile @ k_tile.transpose(-1, -2)  # (B, H_kv, G·tq, tk)
        if p.softcap is not None:
            scores = torch.tanh(scores / p.softcap) * p.softcap
        if needs_mask:
            allowed = _tile_allowed(p, q0, q1, k0, k1)  # (B or 1, tq, tk)
            # Keys no row of this tile may see are zeroed: 0 · NaN would still be NaN.
            unseen = ~allowed.any(1)
            if unseen.any():
                v_tile = v_tile.masked_fill(unseen[:, None, :, None], 0)
            blocked = ~allowed[:, None, None]  # (B or 1, 1, 1, tq, tk) against G rows
            scores.view(b, kv_heads, group, q1 - q0, k1 - k0).masked_fill_(blocked, -math.inf)

        new_max = torch.maximum(row_max, scores.amax(-1))
        # Rows that have seen nothing yet keep max -inf; use 0 there so exp() gives 0, not NaN.
        safe_max = torch.where(torch.isinf(new_max), 0.0, new_max)
        if scores.requires_grad:  # amax and exp save tensors for backward: no in-place
            weights = torch.exp(scores - safe_max.unsqueeze(-1))
        else:  # in place on the big tile, saving two tile-sized allocations
            weights = scores.sub_(safe_max.unsqueeze(-1)).exp_()
        rescale = torch.exp(row_max - safe_max)
        row_sum = row_sum * rescale + weights.sum(-1)
        acc = acc * rescale.unsqueeze(-1) + weights @ v_tile
        row_max = new_max

    seen = row_sum > 0
    out = acc / torch.where(seen, row_sum, 1.0).unsqueeze(-1)
    lse = torch.where(seen, row_max + torch.log(torch.where(seen, row_sum, 1.0)), -math.inf)
    return out, lse


def _tile_allowed(p: AttentionProblem, q0: int, q1: int, k0: int, k1: int) -> Tensor:
    device = p.q.device
    rows = torch.arange(q0, q1, device=device).view(1, -1, 1)
    cols = torch.arange(k0, k1, device=device).view(1, 1, -1)
    batch = torch.arange(p.mask.batch_size or 1, device=device).view(-1, 1, 1)
    allowed = p.mask.allowed(batch, rows, cols, p.geometry)
    return allowed.expand(p.mask.batch_size or 1, q1 - q0, k1 - k0)
