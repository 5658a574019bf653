"""Block-sparse attention on torch's fused kernel: gather each query chunk's key tiles.

`tiled` skips empty tiles but runs the online softmax as a chain of small PyTorch ops. This
backend cuts the queries into chunks of `chunk` rows and asks the mask's block summary
which key tiles (also `chunk` wide) each query chunk touches. It copies those tiles side by
side, so every chunk becomes a short dense problem over only the keys it may see, and runs
a batch of chunks through one `scaled_dot_product_attention` call with the mask evaluated
on the gathered positions. A sliding window W thus costs about W + chunk keys per query
instead of N, inside torch's fused kernel. Partial tiles are computed in full and masked,
as any block-sparse kernel does; chunks with fewer tiles than the busiest one are padded
with an all-zero tile that the mask hides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.ops.backends.base import Backend
from attnkit.ops.problem import AttentionProblem


class GatheredBackend(Backend):
    """Block-sparse attention: per query chunk, SDPA over the gathered key tiles it needs."""

    name = "gathered"

    def __init__(self, chunk: int = 64, max_gathered: int = 2**23) -> None:
        # chunk 64: a window of 512 keys then reads 576 (12.5% waste) while the chunks stay
        # long enough for SDPA's kernel; max_gathered bounds the elements of K copied per call.
        self.chunk = check_positive_int("chunk", chunk)
        self.max_gathered = check_positive_int("max_gathered", max_gathered)

    def unsupported(self, p: AttentionProblem) -> str | None:
        if p.return_lse:
            return "torch SDPA does not return the log-sum-exp (use 'tiled')"
        if p.softcap is not None:
            return "torch SDPA has no softcap (use 'tiled')"
        return None

    def run(self, p: AttentionProblem) -> tuple[Tensor, None]:
        c = self.chunk
        n_qt, n_kt = -(-p.n_q // c), -(-p.n_k // c)
        tiles = _key_tiles(p, c, n_qt, n_kt)  # (n_qt, T) key tile ids; n_kt is the zero tile
        b, d, dv = p.batch, p.q.shape[-1], p.v.shape[-1]
        # One zero tile past the end serves as padding; queries are padded to whole chunks.
        extra = (n_kt + 1) * c - p.n_k
        k = F.pad(p.k, (0, 0, 0, extra)).view(b, p.kv_heads, n_kt + 1, c, d)
        v = F.pad(p.v, (0, 0, 0, extra)).view(b, p.kv_heads, n_kt + 1, c, dv)
        q = F.pad(p.q, (0, 0, 0, n_qt * c - p.n_q)) if p.n_q % c else p.q
        q = q.view(b, p.heads, n_qt, c, d)
        # NaN/inf in keys a chunk's rows never see would leak (0 · NaN); finite inputs, the
        # usual case, skip the zeroing pass over the gathered copy.
        guard = not (torch.isfinite(p.k).all() and torch.isfinite(p.v).all())
        out = torch.empty(b, p.heads, n_qt, c, dv, dtype=p.q.dtype, device=p.q.device)
        per_chunk = max(b * p.kv_heads * tiles.shape[1] * c * max(d, dv), 1)
        step = max(1, self.max_gathered // per_chunk)
        for start in range(0, n_qt, step):
            ids = tiles[start : start + step]
            chunk_out = _attend_chunks(p, q, k, v, ids, start, c, guard)
            out[:, :, start : start + len(ids)] = chunk_out.transpose(1, 2)
        return out.view(b, p.heads, n_qt * c, dv)[:, :, : p.n_q], None


def _key_tiles(p: AttentionProblem, c: int, n_qt: int, n_kt: int) -> Tensor:
    """Per query chunk, the ids of the key tiles any sequence's rows may see, ascending,
    padded to the busiest chunk's count with `n_kt` (the zero tile)."""
    device = p.q.device
    if p.mask is None:
        return torch.arange(n_kt, device=device).expand(n_qt, n_kt)
    summary = p.mask.block_summary(p.n_q, p.n_k, c, c, p.q_offset, device=device)
    nonempty = summary.nonempty.any(0)  # (n_qt, n_kt)
    width = max(int(nonempty.sum(1).max()), 1)
    ids = torch.where(nonempty, torch.arange(n_kt, device=device), n_kt)
    return ids.sort(dim=1).values[:, :width]


def _attend_chunks(
    p: AttentionProblem,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    ids: Tensor,
    first: int,
    c: int,
    guard: bool,
) -> Tensor:
    """Output `(batch, chunks, heads, c, dv)` of query chunks `first, first + 1, ...`."""
    b, n_chunks = p.batch, ids.shape[0]
    span = ids.shape[1] * c

    def batch_of_chunks(x: Tensor, heads: int, length: int) -> Tensor:
        # (B, heads, chunks, ..., dim) -> (B·chunks, heads, length, dim); a view when B is 1
        return x.transpose(1, 2).reshape(b * n_chunks, heads, length, x.shape[-1]).contiguous()

    k_g = batch_of_chunks(k[:, :, ids], p.kv_heads, span)
    v_g = batch_of_chunks(v[:, :, ids], p.kv_heads, span)
    q_g = batch_of_chunks(q[:, :, first : first + n_chunks], p.heads, c)

    allowed = _allowed(p, ids, first, c)  # (B or 1, chunks, c, span)
    if guard:  # zero keys no row of the chunk may see, padding included
        hidden = ~allowed.any(2).expand(b, n_chunks, span).reshape(b * n_chunks, 1, span, 1)
        k_g, v_g = k_g.masked_fill(hidden, 0), v_g.masked_fill(hidden, 0)
    attn_mask = allowed.expand(b, n_chunks, c, span).reshape(b * n_chunks, 1, c, span)
    out = F.scaled_dot_product_attention(
        q_g, k_g, v_g, attn_mask=attn_mask, scale=p.scale, enable_gqa=p.group > 1
    )
    blind = ~attn_mask.any(-1, keepdim=True)
    if blind.any():  # rows that see nothing give 0 (the kernel gives NaN there)
        out = out.masked_fill(blind, 0)
    return out.view(b, n_chunks, p.heads, c, p.v.shape[-1])


def _allowed(p: AttentionProblem, ids: Tensor, first: int, c: int) -> Tensor:
    """Mask on the gathered layout: `(B or 1, chunks, c, T·c)`; padding rows/keys are False."""
    device = p.q.device
    n_chunks = ids.shape[0]
    rows = (first + torch.arange(n_chunks, device=device)).view(-1, 1, 1) * c + torch.arange(
        c, device=device
    ).view(1, -1, 1)  # (chunks, c, 1) query rows
    cols = (ids.unsqueeze(-1) * c + torch.arange(c, device=device)).view(n_chunks, 1, -1)
    valid = (rows < p.n_q) & (cols < p.n_k)  # (chunks, c, span)
    if p.mask is None:
        return valid.unsqueeze(0)
    # The chunk axis rides in the mask's leading (batch) axis, one sequence at a time; the
    # mask sees rows and keys inside the problem (clamped) and `valid` drops the padding.
    r, k_pos = rows.clamp(max=p.n_q - 1), cols.clamp(max=p.n_k - 1)
    per_sequence = []
    for seq in range(p.mask.batch_size or 1):
        batch = torch.full((n_chunks, 1, 1), seq, device=device)
        per_sequence.append(p.mask.allowed(batch, r, k_pos, p.geometry) & valid)
    return torch.stack(per_sequence)
