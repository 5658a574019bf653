"""Preallocated per-sequence K/V buffers, grown by doubling when a sequence outgrows them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheFull, CacheStep, KVCache, SlotPool, causal_step_mask
from attnkit.ops import cpu_decode
from attnkit.ops.attention import attention
from attnkit.ops.decode_block import KVStorage
from attnkit.ops.masks import Mask, padding_lengths


@dataclass(frozen=True)
class _Placement:
    """Where one step's new K/V go: the slots `rows` (a slice when consecutive) and, per
    sequence, the buffer `positions` (batch, n_new); `start` when all start at one index
    in consecutive slots, so the write is one block copy."""

    rows: slice | Tensor
    slot_index: Tensor  # (batch, 1)
    positions: Tensor
    start: int | None
    # Views of the k and v buffers for every layer, made once per step (indexing the buffer
    # per layer costs ~30 us of a ~150 us decode layer): where the step writes,
    # (layers, batch, kv_heads, n_new, d), when `start` is set; what it reads,
    # (layers, batch, kv_heads, kv_len, d), when `rows` is a slice.
    written: tuple[Tensor, Tensor] | None
    read: tuple[Tensor, Tensor] | None


class ContiguousCache(KVCache):
    """K/V of every layer in one `(layers, slots, kv_heads, capacity, head_dim)` buffer.

    Each sequence owns a slot. A step whose sequences sit in consecutive slots reads a view
    of the buffer without copying (the usual static batch); other batches gather their slots.
    With `max_len=None` the capacity doubles when a sequence needs more (copying once);
    with a fixed `max_len`, going past it raises `CacheFull`.
    """

    exact_in_pieces = True  # every token's K/V kept as written
    undoes_last_step = True  # a truncated token is only a length: its slot is rewritten

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        max_seqs: int = 1,
        max_len: int | None = None,
        initial_len: int = 256,
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
            ("initial_len", initial_len),
        ):
            check_positive_int(name, value)
        if max_len is not None:
            check_positive_int("max_len", max_len)
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.max_seqs, self.max_len = max_seqs, max_len
        capacity = max_len if max_len is not None else initial_len
        shape = (n_layers, max_seqs, kv_heads, capacity)
        self.k = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(*shape, self.v_head_dim, dtype=dtype, device=device)
        self._slots = SlotPool(max_seqs)
        self._slot: dict[int, int] = {}
        self._placed: tuple[CacheStep, _Placement] | None = None
        self._lengths_for: tuple[CacheStep, bool, Tensor | None] | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.untyped_storage().nbytes() + self.v.untyped_storage().nbytes()

    def _claim(self, seq: int) -> None:
        self._slot[seq] = self._slots.take()

    def prepare(self, seq_ids, n_new: int, token_ids: Tensor | None = None) -> CacheStep:
        seq_ids = self._check_step(seq_ids, n_new)
        start = [self._lengths[s] for s in seq_ids]
        needed = max(start) + n_new
        if needed > self.capacity:
            self._grow(needed)
        for seq, begin in zip(seq_ids, start, strict=True):
            self._lengths[seq] = begin + n_new
        start_t = torch.tensor(start, device=self.k.device)
        self.step = CacheStep(
            seq_ids, start_t, n_new, needed, causal_step_mask(start_t, n_new, needed)
        )
        return self.step

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        step = self._check_update(layer, k, v, self.n_layers)
        place = self._placement(step)
        if place.written is not None:  # one block of the buffer: a plain copy
            place.written[0][layer].copy_(k)
            place.written[1][layer].copy_(v)
        else:
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
            # Advanced indices on dims 0 and 2 come first: the target is (batch, n_new, heads, dim).
            self.k[layer][place.slot_index, :, place.positions] = k.transpose(1, 2)
            self.v[layer][place.slot_index, :, place.positions] = v.transpose(1, 2)
        if place.read is not None:
            k_all, v_all = place.read[0][layer], place.read[1][layer]
        else:
            k_all = self.k[layer, place.rows, :, : step.kv_len]
            v_all = self.v[layer, place.rows, :, : step.kv_len]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # One buffer holds every layer, so the next layer's write would bump the version
            # of the views autograd saves for this layer's backward (which then refuses to
            # run): attention gets copies.
            return k_all.clone(), v_all.clone()
        return k_all, v_all

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, pattern: Mask | None, backend="auto"
    ) -> Tensor:
        """At decode (one query row per sequence, keys in order, no pattern, `auto`, CPU),
        the C++ decode kernel reads the cached views directly, without `attention`'s general
        dispatch (~20 us a layer and step, about what the kernel itself takes on a short
        context); every other step is `update` + mask + `attention`."""
        k_all, v_all = self.update(layer, k, v)
        out = self._decoded(layer, q, k_all, v_all, pattern, backend)
        if out is not None:
            return out
        return attention(q, k_all, v_all, self.layer_mask(layer, pattern), backend=backend)

    def _decoded(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, pattern, backend, scales=None
    ) -> Tensor | None:
        """The decode kernel's output for `q` over this step's views `k`, `v` (int8 with
        their `scales`), or None when the step is not one it serves."""
        fits = backend == "auto" and pattern is None and q.shape[2] == 1
        if not (fits and self.key_positions(layer) is None and _decodable(q, k, v, scales)):
            return None
        decodes, lengths = self._decode_lengths(self.step)
        if not decodes:
            return None
        scale = 1.0 / math.sqrt(q.shape[-1])
        out, _ = cpu_decode.decode_contiguous(q, k, v, lengths, scale, scales=scales)
        return out

    def decode_storage(self) -> KVStorage | None:
        """The buffers as `(layers, slots, capacity, kv_heads, d)` views, one block per slot,
        at a decode step. Subclasses that store otherwise lend their own (rings) or none
        (int8, evicted)."""
        if type(self) is not ContiguousCache:
            return None
        return self._slot_storage()

    def _slot_storage(self, **extra) -> KVStorage | None:
        """`decode_storage` of the buffers, one block per slot, at a decode step."""
        step = self.step
        if step is None or step.n_new != 1:
            return None
        slots = self._placement(step).slot_index
        k, v = self.k.transpose(2, 3), self.v.transpose(2, 3)
        return KVStorage(k, v, slots, step.start, **extra)

    def _placement(self, step: CacheStep) -> _Placement:
        """Where `step`'s tokens go in the buffer; worked out once per step, used by every layer."""
        if self._placed is None or self._placed[0] is not step:
            slots = [self._slot[s] for s in step.seq_ids]
            starts = self._storage_start(step)
            slot_index = torch.tensor(slots, device=self.k.device).view(-1, 1)
            rows: slice | Tensor = slot_index.view(-1)
            if slots == list(range(slots[0], slots[0] + len(slots))):  # consecutive: a view
                rows = slice(slots[0], slots[0] + len(slots))
            first = starts.tolist()
            common = first[0] if isinstance(rows, slice) and len(set(first)) == 1 else None
            positions = starts.view(-1, 1) + torch.arange(step.n_new, device=starts.device)
            written = read = None
            if common is not None:
                new = slice(common, common + step.n_new)
                written = (self.k[:, rows, :, new], self.v[:, rows, :, new])
            if isinstance(rows, slice):
                read = (self.k[:, rows, :, : step.kv_len], self.v[:, rows, :, : step.kv_len])
            self._placed = (step, _Placement(rows, slot_index, positions, common, written, read))
        return self._placed[1]

    def _decode_lengths(self, step: CacheStep) -> tuple[bool, Tensor | None]:
        """Whether `step`'s mask is one the decode kernel reads as key counts (none, or right
        padding), and those counts (None: all keys); worked out once per step."""
        if self._lengths_for is None or self._lengths_for[0] is not step:
            lengths = None if step.mask is None else padding_lengths(step.mask)
            decodes = step.mask is None or lengths is not None
            if lengths is not None:
                lengths = lengths.expand(step.batch).to(torch.long).contiguous()
            self._lengths_for = (step, decodes, lengths)
        return self._lengths_for[1], self._lengths_for[2]

    def _storage_start(self, step: CacheStep) -> Tensor:
        """(batch,) buffer index where each sequence's new tokens start: its length.

        Caches that pack kept tokens (eviction) write elsewhere than the RoPE position.
        """
        return step.start

    def truncate(self, seq: int, length: int) -> None:
        self._check_truncate(seq, length)
        self._lengths[seq] = length

    def fork(self, seq: int) -> int:
        length = self.length(seq)
        child = self.add_sequence()
        src, dst = self._slot[seq], self._slot[child]
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self._lengths[child] = length
        return child

    def free(self, seq: int) -> None:
        self._known(seq)
        self._slots.give_back(self._slot.pop(seq))
        del self._lengths[seq]

    def _grow(self, needed: int) -> None:
        if self.max_len is not None:
            raise CacheFull(
                f"a sequence needs {needed} positions but max_len is {self.max_len}",
                needed=needed,
                available=self.max_len,
                per_sequence=True,
            )
        capacity = max(needed, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], capacity, old.shape[4])
            new[:, :, :, : old.shape[3]] = old
            setattr(self, name, new)


def _decodable(q: Tensor, k: Tensor, v: Tensor, scales: tuple[Tensor, Tensor] | None) -> bool:
    """Whether the decode kernel can take this step as it is (shapes that `attention` would
    accept, a CPU dtype it serves: one for all three, or int8 K/V with float32 scales beside
    a float32 q); anything else goes through `attention`, which explains."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        return False
    if q.shape[1] == 0 or k.shape[1] == 0 or q.shape[1] % k.shape[1] or k.shape[2] == 0:
        return False
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        return False
    if scales is not None:
        int8 = k.dtype == v.dtype == torch.int8 and q.dtype == torch.float32
        if not (int8 and all(s.dtype == torch.float32 for s in scales)):
            return False
    elif not q.dtype == k.dtype == v.dtype:
        return False
    return cpu_decode.can_take(q, k, v)
