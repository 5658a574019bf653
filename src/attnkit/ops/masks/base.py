"""Masks' common ground: where queries and keys sit, tile summaries, the Mask base class and
its combinators `&`, `|`, `~`."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor


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
        """Classify each `block_q x block_k` tile as full, partial or empty.

        The last answer is kept on the mask: a decode step asks the same of one mask in
        every layer.
        """
        _positive_int("block_q", block_q)
        _positive_int("block_k", block_k)
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (n_q, n_k, block_q, block_k, q_offset, device)
        last = self.__dict__.get("_last_summary")
        if last is not None and last[0] == key:
            return last[1]
        summary = self._block_summary(n_q, n_k, block_q, block_k, q_offset, device)
        self._last_summary = (key, summary)
        return summary

    def _block_summary(
        self, n_q: int, n_k: int, block_q: int, block_k: int, q_offset, device: torch.device
    ) -> BlockSummary:
        geo = Geometry.aligned(n_q, n_k, q_offset)
        self.check(self.batch_size or 1, geo)
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
        from attnkit.ops.masks.tensors import from_tensor  # tensors.py builds on this module

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
