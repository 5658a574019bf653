"""Encoder K/V for cross-attention: projected once per request, read by every decoding step."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheFull, KVCache, SlotPool
from attnkit.ops.masks import Mask, padding


@dataclass(frozen=True)
class EncoderStep:
    """The sequences one decoder forward pass reads, and what of their sources is real."""

    seq_ids: tuple[int, ...]
    slots: Tensor  # (batch,) buffer slot of each sequence

    @property
    def batch(self) -> int:
        return len(self.seq_ids)


class EncoderCache(KVCache):
    """Static cross-attention K/V in one `(layers, slots, kv_heads, capacity, head_dim)` buffer.

    Unlike a decoder cache it does not grow token by token: the first decoding step of a
    request projects the encoder output in every cross-attention layer and `store`s it; every
    later step `read`s it. `length(seq)` is the number of real (unpadded) source tokens, so
    the reader's mask is right padding. The buffer is allocated at the first `store` with the
    source length as capacity (or `max_len` up front) and grows only if a longer source comes.

        cache.select(seq_ids)                       # per forward pass
        if not cache.holds(layer): cache.store(layer, k, v, lengths)
        k, v, mask = cache.read(layer)              # mask: padding(lengths) or None
    """

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        max_seqs: int = 1,
        max_len: int | None = None,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_layers", n_layers),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("max_seqs", max_seqs),
        ):
            check_positive_int(name, value)
        if max_len is not None:
            check_positive_int("max_len", max_len)
        if v_head_dim is not None:
            check_positive_int("v_head_dim", v_head_dim)
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.max_seqs, self.max_len = max_seqs, max_len
        self.dtype, self.device = dtype, torch.device(device)
        self.k = self._buffer(max_len or 0, head_dim)
        self.v = self._buffer(max_len or 0, self.v_head_dim)
        self._slots = SlotPool(max_seqs)
        self._slot: dict[int, int] = {}
        self._filled: dict[int, set[int]] = {}  # layers whose K/V each sequence holds
        self.step: EncoderStep | None = None  # type: ignore[assignment]

    def _buffer(self, capacity: int, dim: int) -> Tensor:
        shape = (self.n_layers, self.max_seqs, self.kv_heads, capacity, dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    @property
    def capacity(self) -> int:
        """Source positions each slot can hold (0 before the first `store`)."""
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()

    def _claim(self, seq: int) -> None:
        self._slot[seq] = self._slots.take()
        self._filled[seq] = set()

    # -- per forward pass ---------------------------------------------------------------
    def select(self, seq_ids: list[int] | tuple[int, ...]) -> EncoderStep:
        """The sequences (one per batch row, in order) the next forward pass reads or fills."""
        seq_ids = self._check_step(seq_ids, 1)
        slots = torch.tensor([self._slot[s] for s in seq_ids], device=self.device)
        self.step = EncoderStep(seq_ids, slots)
        return self.step

    def holds(self, layer: int) -> bool:
        """Whether every selected sequence already holds `layer`'s encoder K/V."""
        step = self._current_step()
        self._check_layer(layer)
        return all(layer in self._filled[s] for s in step.seq_ids)

    def store(self, layer: int, k: Tensor, v: Tensor, lengths: Tensor | None = None) -> None:
        """Keep `layer`'s encoder K/V `(batch, kv_heads, src_len, head_dim)` for the selection.

        `lengths` `(batch,)` counts each row's real source tokens (right padding); None means
        all `src_len`. Positions past a row's length are stored but never read.
        """
        step = self._current_step()
        self._check_layer(layer)
        src_len = self._check_kv(step, k, v)
        lengths = self._check_lengths(step, lengths, src_len)
        if src_len > self.capacity:
            self._grow(src_len)
        slots = step.slots
        self.k[layer, slots, :, :src_len] = k.to(self.dtype)
        self.v[layer, slots, :, :src_len] = v.to(self.dtype)
        for seq, n in zip(step.seq_ids, lengths.tolist(), strict=True):
            self._filled[seq].add(layer)
            self._lengths[seq] = n

    def read(self, layer: int) -> tuple[Tensor, Tensor, Mask | None]:
        """`layer`'s K/V views for the selection, cut at the longest source, and their mask."""
        step = self._current_step()
        if not self.holds(layer):
            missing = [s for s in step.seq_ids if layer not in self._filled[s]]
            raise RuntimeError(
                f"sequences {missing} hold no encoder K/V for layer {layer}: store() them first"
            )
        lengths = [self._lengths[s] for s in step.seq_ids]
        kv_len = max(lengths)
        slots = step.slots.tolist()
        if slots == list(range(slots[0], slots[0] + len(slots))):  # consecutive: a view
            rows: slice | Tensor = slice(slots[0], slots[0] + len(slots))
        else:
            rows = step.slots
        k, v = self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]
        ragged = any(n != kv_len for n in lengths)
        return k, v, padding(torch.tensor(lengths, device=self.device)) if ragged else None

    # -- sequences ------------------------------------------------------------------------
    def truncate(self, seq: int, length: int) -> None:
        """Encoder K/V are static: only truncating to the stored length (a no-op) is allowed.

        Speculative-decoding rollback truncates the decoder's self-attention cache only.
        """
        if length != self.length(seq):
            raise ValueError(
                f"an EncoderCache holds a whole source and cannot be truncated: sequence {seq} "
                f"has {self.length(seq)} source tokens, got length={length!r}"
            )

    def fork(self, seq: int) -> int:
        self._known(seq)
        child = self.add_sequence()
        src, dst = self._slot[seq], self._slot[child]
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self._lengths[child] = self._lengths[seq]
        self._filled[child] = set(self._filled[seq])
        return child

    def free(self, seq: int) -> None:
        self._known(seq)
        self._slots.give_back(self._slot.pop(seq))
        del self._lengths[seq], self._filled[seq]
        if self.step is not None and seq in self.step.seq_ids:
            self.step = None

    # -- the decoder-cache protocol does not apply ------------------------------------------
    def prepare(self, seq_ids, n_new: int, token_ids: Tensor | None = None):
        raise TypeError("EncoderCache is static: use select(seq_ids), then store() or read()")

    def update(self, layer: int, k: Tensor, v: Tensor):
        raise TypeError("EncoderCache is static: use select(seq_ids), then store() or read()")

    # -- checks ---------------------------------------------------------------------------
    def _current_step(self) -> EncoderStep:
        if self.step is None:
            raise RuntimeError("no sequences selected: call cache.select(seq_ids) first")
        return self.step

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an integer in [0, {self.n_layers}), got {layer!r}")

    def _check_kv(self, step: EncoderStep, k: Tensor, v: Tensor) -> int:
        want = {"k": self.head_dim, "v": self.v_head_dim}
        for name, t in (("k", k), ("v", v)):
            if (
                t.dim() != 4
                or t.shape[:2] != (step.batch, self.kv_heads)
                or t.shape[3] != want[name]
            ):
                raise ValueError(
                    f"{name} must be (batch={step.batch}, kv_heads={self.kv_heads}, src_len, "
                    f"{want[name]}), got {tuple(t.shape)}"
                )
        if k.shape[2] != v.shape[2]:
            raise ValueError(f"k and v differ in src_len: {k.shape[2]} and {v.shape[2]}")
        if self.max_len is not None and k.shape[2] > self.max_len:
            raise CacheFull(
                f"a source of {k.shape[2]} tokens exceeds max_len {self.max_len}",
                needed=k.shape[2],
                available=self.max_len,
            )
        return k.shape[2]

    def _check_lengths(self, step: EncoderStep, lengths: Tensor | None, src_len: int) -> Tensor:
        if lengths is None:
            return torch.full((step.batch,), src_len, dtype=torch.long)
        return check_source_lengths(lengths, step.batch, src_len).cpu()

    def _grow(self, capacity: int) -> None:
        # Sources arrive whole, so grow to exactly what is needed (no doubling).
        for name, dim in (("k", self.head_dim), ("v", self.v_head_dim)):
            new = self._buffer(capacity, dim)
            old = getattr(self, name)
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_source_lengths(lengths: object, batch: int, src_len: int) -> Tensor:
    """`lengths` as a `(batch,)` integer tensor with values in [0, src_len], else ValueError."""
    if not isinstance(lengths, Tensor) or lengths.dtype not in _INT_DTYPES:
        got = lengths.dtype if isinstance(lengths, Tensor) else type(lengths).__name__
        raise TypeError(f"memory lengths must be an integer tensor, got {got}")
    if lengths.shape != (batch,):
        raise ValueError(
            f"memory lengths must have shape ({batch},), one per row, got {tuple(lengths.shape)}"
        )
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > src_len):
        raise ValueError(f"memory lengths must be in [0, {src_len}], got {lengths.tolist()}")
    return lengths.long()
