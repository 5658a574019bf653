"""Positional masks: rules over the query position i and the key position j only."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.ops.masks.base import Mask, _Or, _positive_int


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


def window_and_sinks(mask: Mask | None) -> tuple[int, int] | None:
    """`(W, S)` when `mask` is `sliding_window(W)` or `sliding_window(W) | sinks(S)` (either
    order), the layouts the banded kernel serves; None for any other mask."""
    if isinstance(mask, _SlidingWindow):
        return mask.size, 0
    if isinstance(mask, _Or):
        window = [m for m in mask.parts if isinstance(m, _SlidingWindow)]
        sink = [m for m in mask.parts if isinstance(m, _Sinks)]
        if len(window) == 1 and len(sink) == 1:
            return window[0].size, sink[0].n
    return None


def window_and_sinks_mask(window: int, n_sinks: int = 0) -> Mask:
    """`sliding_window(window) | sinks(n_sinks)`, or the window alone without sinks (the
    inverse of `window_and_sinks`)."""
    return sliding_window(window) | sinks(n_sinks) if n_sinks else sliding_window(window)


def window_within(seen: tuple[int, int] | None, window: int, n_sinks: int) -> bool:
    """Whether a layer seeing `seen` = (window, sinks) (as `window_and_sinks` gives; None
    for any other mask) sees nothing outside `sliding_window(window) | sinks(n_sinks)`:
    a cache keeping that window holds every key such a layer needs."""
    return seen is not None and seen[0] <= window and seen[1] <= n_sinks
