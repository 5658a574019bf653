"""Block-sparse attention on torch's fused kernel: each query chunk over only its key tiles.

`tiled` skips empty tiles but runs the online softmax as a chain of small PyTorch ops. This
backend cuts the queries into chunks of `chunk` rows and asks the mask's block summary
which key tiles (also `chunk` wide) each query chunk touches. Every chunk then becomes a
short dense problem over only those keys, and a batch of chunks runs through one
`scaled_dot_product_attention` call with the mask evaluated on the chunk's key positions.
A sliding window W thus costs about W + chunk keys per query instead of N, inside torch's
fused kernel. Partial tiles are computed in full and masked, as any block-sparse kernel does.

The chunks' keys come one of two ways:
- a band (sliding windows, chunked causal): chunk i sees tiles i + delta .. i + delta +
  width - 1 for one `delta`. Overlapping strided views of K and V give every chunk its
  keys without copying anything.
- otherwise (sinks, strided or block-sparse layouts): the tiles are copied side by side,
  chunks with fewer tiles than the busiest one padded with a zero tile the mask hides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.ops.backends.base import Backend
from attnkit.ops.backends.sdpa import sdpa_limits
from attnkit.ops.problem import AttentionProblem
from attnkit.ops.transforms import TRANSFORM_RUNNING, transform_active

# A band is used when it is at most this much wider than the busiest chunk's tile count.
BAND_SLACK = 1.25


class GatheredBackend(Backend):
    """Block-sparse attention: per query chunk, SDPA over the key tiles it needs."""

    name = "gathered"

    def __init__(self, chunk: int = 64, max_keys: int = 2**23) -> None:
        # chunk 64: a window of 512 keys then reads 576 (12.5% waste) while the chunks stay
        # long enough for SDPA's kernel; max_keys bounds the K elements (and the mask) per call.
        self.chunk = check_positive_int("chunk", chunk)
        self.max_keys = check_positive_int("max_keys", max_keys)

    def unsupported(self, p: AttentionProblem) -> str | None:
        if transform_active():  # it asks its inputs' values (finite?) and fills torch.empty
            return f"{TRANSFORM_RUNNING}: use 'tiled' (or 'auto', which takes it then)"
        return sdpa_limits(p)

    def run(self, p: AttentionProblem) -> tuple[Tensor, None]:
        c = self.chunk
        n_qt, n_kt = -(-p.n_q // c), -(-p.n_k // c)
        nonempty = _nonempty_tiles(p, c, n_qt, n_kt)
        tile_count = max(int(nonempty.sum(1).max()), 1) if n_qt and n_kt else 1
        delta, width = _band(nonempty)
        # NaN/inf in keys a chunk's rows never see would leak (0 · NaN): only the gathered
        # copy can zero them, so non-finite inputs (rare: garbage in unused cache slots)
        # take that path.
        finite = bool(torch.isfinite(p.k).all() and torch.isfinite(p.v).all())
        banded = finite and width <= BAND_SLACK * tile_count
        keys = (
            _BandedKeys(p, c, delta, width) if banded else _GatheredKeys(p, c, nonempty, tile_count)
        )

        b, d, dv = p.batch, p.q.shape[-1], p.v.shape[-1]
        q = F.pad(p.q, (0, 0, 0, n_qt * c - p.n_q)) if p.n_q % c else p.q
        q = q.view(b, p.heads, n_qt, c, d)
        out = torch.empty(b, p.heads, n_qt, c, dv, dtype=p.q.dtype, device=p.q.device)
        step = max(1, self.max_keys // max(b * p.kv_heads * keys.span * max(d, dv), 1))
        for first in range(0, n_qt, step):
            chunks = range(first, min(first + step, n_qt))
            k, v, cols = keys.chunks(chunks)  # (B, chunks, Hkv, span, d) views or copies
            allowed = _allowed(p, chunks, cols, c)  # (B or 1, chunks, c, span)
            if not finite:  # zero keys no row of the chunk may see, padding included
                hidden = ~allowed.any(2).unsqueeze(2).unsqueeze(-1)  # (B|1, chunks, 1, span, 1)
                k, v = k.masked_fill(hidden, 0), v.masked_fill(hidden, 0)
            for seq in range(b):
                mask = allowed[seq if allowed.shape[0] > 1 else 0].unsqueeze(1)
                o = F.scaled_dot_product_attention(
                    q[seq, :, first : chunks.stop].transpose(0, 1),
                    k[seq],
                    v[seq],
                    attn_mask=mask,
                    scale=p.scale,
                    enable_gqa=p.group > 1,
                )
                blind = ~mask.any(-1, keepdim=True)
                if blind.any():  # rows that see nothing give 0 (the kernel gives NaN there)
                    o = o.masked_fill(blind, 0)
                out[seq, :, first : chunks.stop] = o.transpose(0, 1)
        return out.view(b, p.heads, n_qt * c, dv)[:, :, : p.n_q], None


def _nonempty_tiles(p: AttentionProblem, c: int, n_qt: int, n_kt: int) -> Tensor:
    """(n_qt, n_kt) bool: may any row of query chunk i (of any sequence) see key tile j?"""
    if p.mask is None:
        return torch.ones(n_qt, n_kt, dtype=torch.bool, device=p.q.device)
    summary = p.mask.block_summary(p.n_q, p.n_k, c, c, p.q_offset, device=p.q.device)
    return summary.nonempty.any(0)


def _band(nonempty: Tensor) -> tuple[int, int]:
    """(delta, width): every chunk i's tiles lie in i + delta .. i + delta + width - 1."""
    rows = nonempty.any(1)
    if not rows.any():
        return 0, 1
    n_kt = nonempty.shape[1]
    tiles = torch.arange(n_kt, device=nonempty.device)
    lo = torch.where(nonempty, tiles, n_kt).amin(1)
    hi = torch.where(nonempty, tiles, -1).amax(1)
    chunk = torch.arange(nonempty.shape[0], device=nonempty.device)
    delta = int((lo - chunk)[rows].min())
    return delta, int((hi - chunk)[rows].max()) - delta + 1


class _BandedKeys:
    """Chunk i's keys are tiles i + delta ... of K padded with zeros at both ends: overlapping
    strided views, one per sequence, with no copy."""

    def __init__(self, p: AttentionProblem, c: int, delta: int, width: int) -> None:
        n_qt = -(-p.n_q // c)
        self.c, self.delta, self.span = c, delta, width * c
        front = max(0, -delta) * c
        back = max(0, (n_qt - 1 + delta + width) * c - p.n_k)
        self.k, self.v = (F.pad(t, (0, 0, front, back)).contiguous() for t in (p.k, p.v))
        self.first_row = (delta * c) + front  # padded row where chunk 0's keys start

    def chunks(self, chunks: range) -> tuple[Tensor, Tensor, Tensor]:
        views = []
        for t in (self.k, self.v):
            b, heads, rows, d = t.shape
            start = t.storage_offset() + (self.first_row + chunks.start * self.c) * d
            views.append(
                t.as_strided(
                    (b, len(chunks), heads, self.span, d),
                    (heads * rows * d, self.c * d, rows * d, d, 1),
                    start,
                )
            )
        first_key = (torch.arange(chunks.start, chunks.stop) + self.delta) * self.c
        cols = first_key.unsqueeze(1) + torch.arange(self.span)  # may be < 0 or >= n_k
        return views[0], views[1], cols.to(self.k.device)


class _GatheredKeys:
    """Chunk i's nonempty tiles copied side by side, padded with an all-zero tile."""

    def __init__(self, p: AttentionProblem, c: int, nonempty: Tensor, width: int) -> None:
        """`width`: the busiest chunk's tile count, which every chunk is padded to."""
        n_kt = nonempty.shape[1]
        ids = torch.where(nonempty, torch.arange(n_kt, device=nonempty.device), n_kt)
        self.ids = ids.sort(dim=1).values[:, :width]  # ascending; n_kt = the zero tile
        self.c, self.n_kt, self.span = c, n_kt, width * c
        extra = (n_kt + 1) * c - p.n_k
        b, heads = p.batch, p.kv_heads
        self.k = F.pad(p.k, (0, 0, 0, extra)).view(b, heads, n_kt + 1, c, p.k.shape[-1])
        self.v = F.pad(p.v, (0, 0, 0, extra)).view(b, heads, n_kt + 1, c, p.v.shape[-1])

    def chunks(self, chunks: range) -> tuple[Tensor, Tensor, Tensor]:
        ids = self.ids[chunks.start : chunks.stop]
        # (B, Hkv, chunks, T, c, d) -> (B, chunks, Hkv, T·c, d)
        k, v = (t[:, :, ids].transpose(1, 2).flatten(3, 4) for t in (self.k, self.v))
        cols = ids.unsqueeze(-1) * self.c + torch.arange(self.c, device=ids.device)
        cols = torch.where((ids == self.n_kt).unsqueeze(-1), -1, cols)  # padding: no key
        return k, v, cols.flatten(1)


def _allowed(p: AttentionProblem, chunks: range, cols: Tensor, c: int) -> Tensor:
    """The mask on the chunks' key layout: `(B or 1, chunks, c, span)`; positions outside
    the problem (query padding, key padding, the zero tile) are False."""
    device = p.q.device
    rows = torch.arange(chunks.start * c, chunks.stop * c, device=device).view(-1, c, 1)
    cols = cols.unsqueeze(1)  # (chunks, 1, span)
    valid = (rows < p.n_q) & (cols >= 0) & (cols < p.n_k)  # (chunks, c, span)
    if p.mask is None:
        return valid.unsqueeze(0)
    # The chunk axis rides in the mask's leading (batch) axis, one sequence at a time; the
    # mask sees rows and keys inside the problem (clamped) and `valid` drops the rest.
    r, k_pos = rows.clamp(max=p.n_q - 1), cols.clamp(0, p.n_k - 1)
    per_sequence = []
    for seq in range(p.mask.batch_size or 1):
        batch = torch.full((len(chunks), 1, 1), seq, device=device)
        per_sequence.append(p.mask.allowed(batch, r, k_pos, p.geometry) & valid)
    return torch.stack(per_sequence)
