"""Attention masks as small values: predicates over (batch, query, key) with combinators.

A mask answers "may query row `q` see key `kv`?" Positional masks reason about absolute
positions: query row `i` sits at position `q_offset + i`, with `q_offset = n_k - n_q` by
default (bottom-right alignment, as FlashAttention), so decoding against a cache and
chunked prefill need no extra arguments. Key `j` sits at position `j`.

Every mask gives two views:
- `dense(n_q, n_k)`: a boolean tensor broadcastable to `(batch, 1, n_q, n_k)`;
- `block_summary(n_q, n_k, block_q, block_k)`: per tile, whether it is full, empty or
  partial, computed from the mask's definition without building the dense matrix. Tiled
  backends skip empty tiles and drop the mask on full ones, which is what makes a sliding
  window cost O(N·W) instead of O(N²).

Which masks include causality: `causal`, `sliding_window`, `strided` and `sinks` describe
what a query sees of the past (and so never see the future); `prefix_lm` is causal after
a bidirectional prefix (prefix rows also see later prefix keys);
`chunked`, `document`, `padding`, `block_sparse` and dense tensors do not — combine them
with `causal() & ...` for a decoder.

Summaries are conservative where exactness would cost too much: `nonempty` may say True
for a tile that is really empty, `full` may say False for a tile that is really full
(both only cost speed), never the other way round.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "BlockSummary",
    "Geometry",
    "Mask",
    "block_sparse",
    "causal",
    "chunked",
    "document",
    "from_tensor",
    "padding",
    "prefix_lm",
    "sinks",
    "sliding_window",
    "strided",
]


@dataclass(frozen=True)
class Geometry:
    """Where queries and keys sit: `n_q` rows at positions `q_offset + i`, `n_k` keys at `j`."""

    n_q: int
    n_k: int
    q_offset: int

    @classmethod
    def aligned(cls, n_q: int, n_k: int, q_offset: int | None = None) -> Geometry:
        """Bottom-right alignment unless an explicit offset is given."""
        return cls(n_q, n_k, n_k - n_q if q_offset is None else q_offset)


@dataclass(frozen=True)
class BlockSummary:
    """Per-tile classification, each tensor shaped `(batch or 1, n_q_blocks, n_k_blocks)`."""

    block_q: int
    block_k: int
    nonempty: Tensor
    full: Tensor

    @property
    def partial(self) -> Tensor:
        return self.nonempty & ~self.full

    @property
    def density(self) -> float:
        """Fraction of tiles that must be computed."""
        return self.nonempty.float().mean().item()


def _positive_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _tile_bounds(n: int, block: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """First and last index (inclusive) of each tile of `block` over `range(n)`."""
    lo = torch.arange(0, n, block, device=device)
    return lo, torch.clamp(lo + block - 1, max=n - 1)


class Mask:
    """Base class: subclasses define `allowed` (dense truth) and `_summary` (per tile)."""

    batch_size: int | None = None  # None: the same mask for every sequence in the batch

    # -- what each mask defines ---------------------------------------------------------
    def allowed(self, b: Tensor, q_idx: Tensor, kv_idx: Tensor, geo: Geometry) -> Tensor:
        """Boolean tensor: may row `q_idx` of batch `b` see key `kv_idx`? Broadcasts."""
        raise NotImplementedError

    def _summary(
        self, geo: Geometry, q_tiles: tuple[Tensor, Tensor], k_tiles: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """(nonempty, full) per tile; tiles given as row bounds shaped (1,nQ,1) / (1,1,nK)."""
        raise NotImplementedError

    def check(self, batch: int, geo: Geometry) -> None:
        """Raise ValueError if the mask cannot describe this problem."""
        if self.batch_size is not None and self.batch_size not in (1, batch):
            raise ValueError(
                f"mask {self!r} is for batch size {self.batch_size}, "
                f"but the inputs have batch size {batch}"
            )

    def to(self, device: torch.device) -> Mask:
        """The same mask with its tensors (if any) on `device`."""
        return self

    # -- derived views ------------------------------------------------------------------
    def dense(
        self,
        n_q: int,
        n_k: int,
        q_offset: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Boolean tensor of shape `(batch or 1, 1, n_q, n_k)`."""
        geo = Geometry.aligned(n_q, n_k, q_offset)
        self.check(self.batch_size or 1, geo)
        device = torch.device(device) if device is not None else torch.device("cpu")
        rows = torch.arange(n_q, device=device).view(1, n_q, 1)
        cols = torch.arange(n_k, device=device).view(1, 1, n_k)
        b = torch.arange(self.batch_size or 1, device=device).view(-1, 1, 1)
        out = self.to(device).allowed(b, rows, cols, geo)
        return out.expand(self.batch_size or 1, n_q, n_k).unsqueeze(1)

    def block_summary(
        self,
        n_q: int,
        n_k: int,
        block_q: int,
        block_k: int,
        q_offset: int | None = None,
        device: torch.device | str | None = None,
    ) -> BlockSummary:
        """Classify each `block_q x block_k` tile as full, partial or empty."""
        _positive_int("block_q", block_q)
        _positive_int("block_k", block_k)
        geo = Geometry.aligned(n_q, n_k, q_offset)
        self.check(self.batch_size or 1, geo)
        device = torch.device(device) if device is not None else torch.device("cpu")
        q_lo, q_hi = _tile_bounds(n_q, block_q, device)
        k_lo, k_hi = _tile_bounds(n_k, block_k, device)
        shape = (self.batch_size or 1, len(q_lo), len(k_lo))
        if n_q == 0 or n_k == 0:  # no tiles at all
            nothing = torch.zeros(shape, dtype=torch.bool, device=device)
            return BlockSummary(block_q, block_k, nothing, nothing)
        q_tiles = (q_lo.view(1, -1, 1), q_hi.view(1, -1, 1))
        k_tiles = (k_lo.view(1, 1, -1), k_hi.view(1, 1, -1))
        nonempty, full = self.to(device)._summary(geo, q_tiles, k_tiles)
        nonempty, full = nonempty.expand(shape), full.expand(shape)
        return BlockSummary(block_q, block_k, nonempty.contiguous(), (full & nonempty).contiguous())

    # -- combinators --------------------------------------------------------------------
    def __and__(self, other: Mask | Tensor) -> Mask:
        return _And(self, _as_mask(other))

    def __rand__(self, other: Tensor) -> Mask:
        return _And(_as_mask(other), self)

    def __or__(self, other: Mask | Tensor) -> Mask:
        return _Or(self, _as_mask(other))

    def __ror__(self, other: Tensor) -> Mask:
        return _Or(_as_mask(other), self)

    def __invert__(self) -> Mask:
        return _Not(self)

    # -- masks are values: equal when of one kind with equal parameters -------------------
    def _parameters(self) -> list[tuple[str, object]]:
        return sorted((k, v) for k, v in vars(self).items() if not k.startswith("_"))

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return False
        mine, theirs = self._parameters(), other._parameters()
        return [k for k, _ in mine] == [k for k, _ in theirs] and all(
            _same(a, b) for (_, a), (_, b) in zip(mine, theirs, strict=True)
        )

    def __hash__(self) -> int:
        return hash((type(self), *((k, _hashable(v)) for k, v in self._parameters())))


def _same(a: object, b: object) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    return bool(a == b)


def _hashable(value: object) -> object:
    """Tensors hash by shape and dtype (equal tensors share those); everything else as is."""
    return (tuple(value.shape), value.dtype) if isinstance(value, Tensor) else value


def _as_mask(value: object) -> Mask:
    if isinstance(value, Mask):
        return value
    if isinstance(value, Tensor):
        return from_tensor(value)
    raise TypeError(f"masks combine with masks or boolean tensors, got {type(value).__name__}")


def _common_batch_size(*sizes: int | None) -> int | None:
    """The one batch size several per-batch parts agree on (None or 1 broadcast)."""
    distinct = {n for n in sizes if n not in (None, 1)}
    if len(distinct) > 1:
        raise ValueError(f"cannot combine masks for different batch sizes {sorted(distinct)}")
    return distinct.pop() if distinct else None


class _Combined(Mask):
    def __init__(self, *parts: Mask) -> None:
        self.parts = parts
        self.batch_size = _common_batch_size(*(p.batch_size for p in parts))

    def check(self, batch: int, geo: Geometry) -> None:
        for part in self.parts:
            part.check(batch, geo)

    def to(self, device: torch.device) -> Mask:
        return type(self)(*(p.to(device) for p in self.parts))


class _And(_Combined):
    def allowed(self, b, q_idx, kv_idx, geo):
        return self.parts[0].allowed(b, q_idx, kv_idx, geo) & self.parts[1].allowed(
            b, q_idx, kv_idx, geo
        )

    def _summary(self, geo, q_tiles, k_tiles):
        (a_any, a_all), (b_any, b_all) = (p._summary(geo, q_tiles, k_tiles) for p in self.parts)
        return a_any & b_any, a_all & b_all

    def __repr__(self) -> str:
        return f"({self.parts[0]!r} & {self.parts[1]!r})"


class _Or(_Combined):
    def allowed(self, b, q_idx, kv_idx, geo):
        return self.parts[0].allowed(b, q_idx, kv_idx, geo) | self.parts[1].allowed(
            b, q_idx, kv_idx, geo
        )

    def _summary(self, geo, q_tiles, k_tiles):
        (a_any, a_all), (b_any, b_all) = (p._summary(geo, q_tiles, k_tiles) for p in self.parts)
        return a_any | b_any, a_all | b_all

    def __repr__(self) -> str:
        return f"({self.parts[0]!r} | {self.parts[1]!r})"


class _Not(_Combined):
    def allowed(self, b, q_idx, kv_idx, geo):
        return ~self.parts[0].allowed(b, q_idx, kv_idx, geo)

    def _summary(self, geo, q_tiles, k_tiles):
        any_, all_ = self.parts[0]._summary(geo, q_tiles, k_tiles)
        return ~all_, ~any_

    def __repr__(self) -> str:
        return f"~{self.parts[0]!r}"


# -- positional masks (no tensors, the same for every sequence) -----------------------------


class _Positional(Mask):
    """A mask that depends only on the query position `i` and the key position `j`."""

    def allowed(self, b, q_idx, kv_idx, geo):
        return self._rule(q_idx + geo.q_offset, kv_idx)

    def _summary(self, geo, q_tiles, k_tiles):
        return self._tile_rule(q_tiles[0] + geo.q_offset, q_tiles[1] + geo.q_offset, *k_tiles)

    def _rule(self, i: Tensor, j: Tensor) -> Tensor:
        raise NotImplementedError

    def _tile_rule(self, qs, qe, ks, ke) -> tuple[Tensor, Tensor]:
        """(nonempty, full) for query positions [qs, qe] and keys [ks, ke], inclusive."""
        raise NotImplementedError


class _Causal(_Positional):
    def _rule(self, i, j):
        return j <= i

    def _tile_rule(self, qs, qe, ks, ke):
        return ks <= qe, ke <= qs

    def __repr__(self) -> str:
        return "causal()"


class _SlidingWindow(_Positional):
    def __init__(self, size: int) -> None:
        self.size = _positive_int("size", size)

    def _rule(self, i, j):
        return (j <= i) & (i - j < self.size)

    def _tile_rule(self, qs, qe, ks, ke):
        nonempty = (ks <= qe) & (qs - ke < self.size)
        full = (ke <= qs) & (qe - ks < self.size)
        return nonempty, full

    def __repr__(self) -> str:
        return f"sliding_window({self.size})"


class _Chunked(_Positional):
    def __init__(self, size: int) -> None:
        self.size = _positive_int("size", size)

    def _rule(self, i, j):
        return torch.div(i, self.size, rounding_mode="floor") == j // self.size

    def _tile_rule(self, qs, qe, ks, ke):
        c = self.size
        qcs, qce = torch.div(qs, c, rounding_mode="floor"), torch.div(qe, c, rounding_mode="floor")
        kcs, kce = ks // c, ke // c
        nonempty = (qcs <= kce) & (kcs <= qce)
        full = (qcs == qce) & (kcs == kce) & (qcs == kcs)
        return nonempty, full

    def __repr__(self) -> str:
        return f"chunked({self.size})"


class _Strided(_Positional):
    def __init__(self, stride: int) -> None:
        self.stride = _positive_int("stride", stride)

    def _rule(self, i, j):
        return (j <= i) & ((i - j) % self.stride == 0)

    def _tile_rule(self, qs, qe, ks, ke):
        lo = torch.clamp(qs - ke, min=0)  # smallest non-negative distance i - j in the tile
        hi = qe - ks  # largest distance
        nonempty = (hi >= 0) & ((hi // self.stride) * self.stride >= lo)
        single_pair = (qs == qe) & (ks == ke)
        full = (ke <= qs) & ((self.stride == 1) | (single_pair & ((qs - ks) % self.stride == 0)))
        return nonempty, full

    def __repr__(self) -> str:
        return f"strided({self.stride})"


class _Sinks(_Positional):
    def __init__(self, n: int) -> None:
        self.n = _positive_int("n", n, minimum=0)

    def _rule(self, i, j):
        return (j < self.n) & (j <= i)

    def _tile_rule(self, qs, qe, ks, ke):
        return (ks < self.n) & (ks <= qe), (ke < self.n) & (ke <= qs)

    def __repr__(self) -> str:
        return f"sinks({self.n})"


def causal() -> Mask:
    """Each query sees the keys at or before its own position."""
    return _Causal()


def sliding_window(size: int) -> Mask:
    """Causal window: a query sees itself and the `size - 1` keys before it."""
    return _SlidingWindow(size)


def chunked(size: int) -> Mask:
    """Block-local: a query sees every key in its own chunk of `size` positions (not causal)."""
    return _Chunked(size)


def strided(stride: int) -> Mask:
    """Sparse Transformer's strided pattern: keys at distances 0, stride, 2·stride, … back."""
    return _Strided(stride)


def sinks(n: int) -> Mask:
    """The first `n` keys, visible to every query at or after them (StreamingLLM)."""
    return _Sinks(n)


# -- masks that carry tensors -------------------------------------------------------------


def _as_long(name: str, value: object, ndim: tuple[int, ...]) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() not in ndim:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndim))} dims, got {t.dim()}")
    return t.long()


def _one_per_sequence(name: str, count: int) -> None:
    if count == 0:
        raise ValueError(f"{name} must hold at least one sequence's values, got an empty tensor")


def _rows(t: Tensor, b: Tensor) -> Tensor:
    """Row indices into a per-batch tensor for batch indices `b` (one row serves all)."""
    return b if t.shape[0] > 1 else torch.zeros_like(b)


class _PrefixLM(Mask):
    def __init__(self, prefix_len: int | Tensor) -> None:
        lengths = _as_long("prefix_len", prefix_len, ndim=(0, 1)).reshape(-1)
        _one_per_sequence("prefix_len", lengths.numel())
        if (lengths < 0).any():
            raise ValueError(f"prefix_len must be >= 0, got {lengths.tolist()}")
        self.lengths = lengths
        self.batch_size = _common_batch_size(lengths.numel())

    def allowed(self, b, q_idx, kv_idx, geo):
        prefix = self.lengths[_rows(self.lengths, b)]  # (B, 1, 1)
        return (kv_idx <= q_idx + geo.q_offset) | (kv_idx < prefix)

    def _summary(self, geo, q_tiles, k_tiles):
        prefix = self.lengths.view(-1, 1, 1)
        qs, qe = (t + geo.q_offset for t in q_tiles)
        ks, ke = k_tiles
        return (ks <= qe) | (ks < prefix), (ke <= qs) | (ke < prefix)

    def to(self, device):
        return _PrefixLM(self.lengths.to(device))

    def __repr__(self) -> str:
        return f"prefix_lm({self.lengths.tolist()})"


class _Padding(Mask):
    def __init__(self, kv_lengths: Tensor, left: bool) -> None:
        lengths = _as_long("kv_lengths", kv_lengths, ndim=(1,))
        _one_per_sequence("kv_lengths", lengths.numel())
        if (lengths < 0).any():
            raise ValueError(f"kv_lengths must be >= 0, got {lengths.tolist()}")
        self.lengths, self.left = lengths, left
        self.batch_size = _common_batch_size(lengths.numel())

    def check(self, batch, geo):
        super().check(batch, geo)
        if (self.lengths > geo.n_k).any():
            raise ValueError(
                f"kv_lengths must be <= the number of keys {geo.n_k}, got {self.lengths.tolist()}"
            )

    def _first_valid(self, geo: Geometry) -> tuple[Tensor, Tensor]:
        lengths = self.lengths.view(-1, 1, 1)
        start = geo.n_k - lengths if self.left else torch.zeros_like(lengths)
        return start, start + lengths  # valid keys are [start, stop)

    def allowed(self, b, q_idx, kv_idx, geo):
        start, stop = (t.view(-1)[_rows(self.lengths, b)] for t in self._first_valid(geo))
        return (kv_idx >= start) & (kv_idx < stop)

    def _summary(self, geo, q_tiles, k_tiles):
        start, stop = self._first_valid(geo)
        ks, ke = k_tiles
        return (ke >= start) & (ks < stop), (ks >= start) & (ke < stop)

    def to(self, device):
        return _Padding(self.lengths.to(device), self.left)

    def __repr__(self) -> str:
        side = ", left=True" if self.left else ""
        return f"padding({self.lengths.tolist()}{side})"


class _Document(Mask):
    def __init__(self, q_ids: Tensor, kv_ids: Tensor) -> None:
        self.q_ids = _as_long("q_ids", q_ids, ndim=(1, 2))
        self.kv_ids = _as_long("kv_ids", kv_ids, ndim=(1, 2))
        # (n,) ids serve every sequence: one row of a (batch, n) table
        self.q_ids = self.q_ids if self.q_ids.dim() == 2 else self.q_ids.unsqueeze(0)
        self.kv_ids = self.kv_ids if self.kv_ids.dim() == 2 else self.kv_ids.unsqueeze(0)
        _one_per_sequence("q_ids", self.q_ids.shape[0])
        _one_per_sequence("kv_ids", self.kv_ids.shape[0])
        self.batch_size = _common_batch_size(self.q_ids.shape[0], self.kv_ids.shape[0])

    def check(self, batch, geo):
        super().check(batch, geo)
        for name, ids, n in (("q_ids", self.q_ids, geo.n_q), ("kv_ids", self.kv_ids, geo.n_k)):
            if ids.shape[-1] != n:
                raise ValueError(f"{name} has length {ids.shape[-1]}, but the inputs have {n}")

    def allowed(self, b, q_idx, kv_idx, geo):
        q_doc = self.q_ids[_rows(self.q_ids, b), q_idx]  # (B, n_q, 1)
        kv_doc = self.kv_ids[_rows(self.kv_ids, b), kv_idx]  # (B, 1, n_k)
        return q_doc == kv_doc

    def _summary(self, geo, q_tiles, k_tiles):
        q_min, q_max = _tile_min_max(self.q_ids, q_tiles[0].view(-1), q_tiles[1].view(-1))
        k_min, k_max = _tile_min_max(self.kv_ids, k_tiles[0].view(-1), k_tiles[1].view(-1))
        q_min, q_max = q_min.unsqueeze(-1), q_max.unsqueeze(-1)  # (B, nQ, 1)
        k_min, k_max = k_min.unsqueeze(-2), k_max.unsqueeze(-2)  # (B, 1, nK)
        nonempty = (q_min <= k_max) & (k_min <= q_max)
        full = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        return nonempty, full

    def to(self, device):
        return _Document(self.q_ids.to(device), self.kv_ids.to(device))

    def __repr__(self) -> str:
        return f"document(q_ids of shape {tuple(self.q_ids.shape)}, kv_ids ...)"


def _tile_min_max(ids: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max of `ids[:, lo:hi+1]` for each tile; `ids` is (B, n)."""
    n = ids.shape[-1]
    block = int((hi[0] - lo[0] + 1).item()) if len(lo) else 1
    n_tiles = len(lo)
    pad = n_tiles * block - n
    padded = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=-1) if pad else ids
    tiles = padded.view(ids.shape[0], n_tiles, block)
    return tiles.amin(-1), tiles.amax(-1)


class _BlockSparse(Mask):
    def __init__(self, layout: Tensor, block_size: int) -> None:
        if not isinstance(layout, Tensor) or layout.dtype != torch.bool:
            raise TypeError(f"layout must be a boolean tensor, got {_describe(layout)}")
        if layout.dim() not in (2, 3) or layout.numel() == 0:
            raise ValueError(
                f"layout must be a non-empty (q_blocks, k_blocks) or (batch, q_blocks, k_blocks), "
                f"got shape {tuple(layout.shape)}"
            )
        self.layout = layout.reshape(-1, *layout.shape[-2:])
        _one_per_sequence("layout", self.layout.shape[0])
        self.block_size = _positive_int("block_size", block_size)
        self.batch_size = _common_batch_size(self.layout.shape[0])
        # 2D prefix sums: the number of kept blocks in any rectangle in O(1).
        counts = self.layout.long().cumsum(-1).cumsum(-2)
        self._prefix = torch.nn.functional.pad(counts, (1, 0, 1, 0))

    def check(self, batch, geo):
        super().check(batch, geo)
        rows, cols = self.layout.shape[-2:]
        need_rows = -(-(geo.q_offset + geo.n_q) // self.block_size)
        need_cols = -(-geo.n_k // self.block_size)
        if rows < need_rows or cols < need_cols:
            raise ValueError(
                f"layout of shape {tuple(self.layout.shape[-2:])} with block_size "
                f"{self.block_size} does not cover {geo.q_offset + geo.n_q} query positions "
                f"and {geo.n_k} keys: needs at least ({need_rows}, {need_cols}) blocks"
            )

    def allowed(self, b, q_idx, kv_idx, geo):
        i = q_idx + geo.q_offset
        keep = self.layout[
            _rows(self.layout, b), i.clamp(min=0) // self.block_size, kv_idx // self.block_size
        ]
        return keep & (i >= 0)

    def _summary(self, geo, q_tiles, k_tiles):
        bs = self.block_size
        qs, qe = (t + geo.q_offset for t in q_tiles)
        r0, r1 = qs.clamp(min=0) // bs, qe.clamp(min=0) // bs + 1
        c0, c1 = k_tiles[0] // bs, k_tiles[1] // bs + 1
        p = self._prefix
        b = torch.arange(p.shape[0], device=p.device).view(-1, 1, 1)
        kept = p[b, r1, c1] - p[b, r0, c1] - p[b, r1, c0] + p[b, r0, c0]
        return (kept > 0) & (qe >= 0), (kept == (r1 - r0) * (c1 - c0)) & (qs >= 0)

    def to(self, device):
        return _BlockSparse(self.layout.to(device), self.block_size)

    def __repr__(self) -> str:
        return f"block_sparse(layout {tuple(self.layout.shape)}, block_size={self.block_size})"


class _Dense(Mask):
    """A boolean tensor broadcastable to (batch, 1, n_q, n_k), wrapped as a mask."""

    def __init__(self, tensor: Tensor) -> None:
        if not isinstance(tensor, Tensor) or tensor.dtype != torch.bool:
            raise TypeError(
                f"mask must be a Mask or a boolean tensor, got {_describe(tensor)}; "
                "additive float masks are not supported, use a boolean mask (True = keep)"
            )
        if tensor.dim() > 4 or tensor.dim() < 2:
            raise ValueError(
                f"mask tensor must have 2 to 4 dims broadcastable to (batch, 1, n_q, n_k), "
                f"got shape {tuple(tensor.shape)}"
            )
        full = tensor.view((1,) * (4 - tensor.dim()) + tuple(tensor.shape))
        if full.shape[1] != 1:
            raise ValueError(
                f"mask tensor of shape {tuple(tensor.shape)} differs per head; masks must "
                "broadcast to (batch, 1, n_q, n_k) (the same for every head)"
            )
        self.tensor = full[:, 0]  # (B or 1, n_q or 1, n_k or 1)
        self.batch_size = _common_batch_size(self.tensor.shape[0])

    def check(self, batch, geo):
        super().check(batch, geo)
        _, rows, cols = self.tensor.shape
        if rows not in (1, geo.n_q) or cols not in (1, geo.n_k):
            raise ValueError(
                f"mask tensor of shape {tuple(self.tensor.shape)} does not broadcast to "
                f"(batch={batch}, 1, n_q={geo.n_q}, n_k={geo.n_k})"
            )

    def allowed(self, b, q_idx, kv_idx, geo):
        t = self.tensor
        q = q_idx if t.shape[1] > 1 else torch.zeros_like(q_idx)
        kv = kv_idx if t.shape[2] > 1 else torch.zeros_like(kv_idx)
        return t[_rows(t, b), q, kv]

    def _summary(self, geo, q_tiles, k_tiles):
        t = self.tensor.expand(-1, geo.n_q, geo.n_k)
        bq = int(q_tiles[1].view(-1)[0] - q_tiles[0].view(-1)[0] + 1)
        bk = int(k_tiles[1].view(-1)[0] - k_tiles[0].view(-1)[0] + 1)
        nq, nk = q_tiles[0].numel(), k_tiles[0].numel()
        pad = (0, nk * bk - geo.n_k, 0, nq * bq - geo.n_q)
        tiles_any = torch.nn.functional.pad(t, pad, value=False).view(-1, nq, bq, nk, bk)
        tiles_all = torch.nn.functional.pad(t, pad, value=True).view(-1, nq, bq, nk, bk)
        return tiles_any.any(4).any(2), tiles_all.all(4).all(2)

    def to(self, device):
        return _Dense(self.tensor.to(device).unsqueeze(1))

    def __repr__(self) -> str:
        return f"from_tensor(shape {tuple(self.tensor.shape)})"


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__


def prefix_lm(prefix_len: int | Tensor) -> Mask:
    """Bidirectional over the first `prefix_len` keys, causal after (int or one per batch)."""
    return _PrefixLM(prefix_len)


def padding(kv_lengths: Tensor | list[int], *, left: bool = False) -> Mask:
    """Per-sequence key padding: only the first (or, `left=True`, last) `kv_lengths[b]` keys."""
    return _Padding(kv_lengths, left)


def document(q_ids: Tensor, kv_ids: Tensor | None = None) -> Mask:
    """Packed sequences: a query sees keys with the same document id (`kv_ids` defaults to
    `q_ids`). Ids are `(n,)` or `(batch, n)`, indexed by query row and key index."""
    return _Document(q_ids, q_ids if kv_ids is None else kv_ids)


def block_sparse(layout: Tensor, block_size: int) -> Mask:
    """Block-level layout: `layout[i // block_size, j // block_size]` says whether query
    position i sees key j. `layout` is `(q_blocks, k_blocks)` or `(batch, q_blocks, k_blocks)`."""
    return _BlockSparse(layout, block_size)


def from_tensor(mask: Tensor) -> Mask:
    """A boolean tensor (True = attend) broadcastable to `(batch, 1, n_q, n_k)`."""
    return _Dense(mask)
