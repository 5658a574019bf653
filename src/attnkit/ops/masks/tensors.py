"""Masks that carry tensors: prefix lengths, key padding, document ids, block layouts, and
any boolean tensor."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops.masks.base import Geometry, Mask, _And, _common_batch_size, _positive_int


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
        if self.lengths.device == torch.device(device):
            return self
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


def padding_lengths(mask: Mask | None) -> Tensor | None:
    """The `(batch,)` key counts of a right-`padding` mask (each row sees its first keys);
    None for any other mask."""
    if isinstance(mask, _Padding) and not mask.left:
        return mask.lengths
    return None


def document(q_ids: Tensor, kv_ids: Tensor | None = None) -> Mask:
    """Packed sequences: a query sees keys with the same document id (`kv_ids` defaults to
    `q_ids`). Ids are `(n,)` or `(batch, n)`, indexed by query row and key index."""
    return _Document(q_ids, q_ids if kv_ids is None else kv_ids)


def block_sparse(layout: Tensor, block_size: int) -> Mask:
    """Block-level layout: `layout[i // block_size, j // block_size]` says whether query
    position i sees key j. `layout` is `(q_blocks, k_blocks)` or `(batch, q_blocks, k_blocks)`."""
    return _BlockSparse(layout, block_size)


def split_block_sparse(mask: Mask | None) -> tuple[Mask | None, Tensor, int] | None:
    """`(other, layout, block_size)` when `mask` is `block_sparse(layout, block_size)` alone
    (`other` None) or and-ed with one other mask (either order), the forms a block-sparse
    kernel serves; None for any other mask. `layout` is `(batch or 1, q_blocks, k_blocks)`."""
    if isinstance(mask, _BlockSparse):
        return None, mask.layout, mask.block_size
    if isinstance(mask, _And) and len(mask.parts) == 2:
        sparse = [m for m in mask.parts if isinstance(m, _BlockSparse)]
        if len(sparse) == 1:
            other = next(m for m in mask.parts if m is not sparse[0])
            return other, sparse[0].layout, sparse[0].block_size
    return None


def from_tensor(mask: Tensor) -> Mask:
    """A boolean tensor (True = attend) broadcastable to `(batch, 1, n_q, n_k)`."""
    return _Dense(mask)
