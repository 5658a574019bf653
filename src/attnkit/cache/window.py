"""Ring-buffer K/V for sliding-window attention, optionally with attention sinks.

A query at position p sees the keys at positions p-window+1 .. p (itself included) plus the
first `sinks` keys: the mask `sliding_window(window) | sinks(sinks)`. Older keys are never
needed again, so each sequence keeps a fixed number of slots and memory does not grow with
its length. The sinks are StreamingLLM's (Xiao et al., "Efficient Streaming Language Models
with Attention Sinks", 2023): the first tokens soak up attention mass, and keeping them is
what lets a windowed model stream past its training length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheStep
from attnkit.cache.contiguous import ContiguousCache
from attnkit.ops.attention import attention
from attnkit.ops.decode_block import KVStorage
from attnkit.ops.masks import (
    Mask,
    from_tensor,
    window_and_sinks,
    window_and_sinks_mask,
    window_within,
)


class SlidingWindowCache(ContiguousCache):
    """The first `sinks` tokens plus a ring of the recent ones, with each slot's position.

    Slots `[0, sinks)` hold positions `0 .. sinks-1`; the ring holds the others, position p
    in slot `sinks + (p - sinks) % ring`. A step of n new tokens needs the `window - 1`
    tokens before its first one plus the n new ones at once, so the ring has
    `window - 1 + max_new_per_step` slots: writing a step never overwrites a key one of its
    queries still sees. Between steps the slack holds stale keys, hidden by the mask.

    Because slots are reused, keys sit out of order; that is fine because RoPE was applied
    before caching (keys carry their positions) and the step's mask is built from the
    stored positions. Storage per layer is `(max_seqs, kv_heads, capacity, head_dim)` for K
    and V, `capacity = sinks + window - 1 + max_new_per_step`, plus a `(max_seqs, capacity)`
    int64 table of positions; `nbytes` counts all three and does not depend on length.
    """

    # A step writes at most `max_new_per_step` tokens, so it overwrites only keys older
    # than the window of its first token: taking any of them back leaves what is needed.
    undoes_last_step = True

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        window: int,
        sinks: int = 0,
        max_seqs: int = 1,
        max_new_per_step: int = 512,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        check_positive_int("window", window)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")
        check_positive_int("max_new_per_step", max_new_per_step)
        self.window, self.sinks, self.max_new_per_step = window, sinks, max_new_per_step
        self.max_step_tokens = max_new_per_step
        self.ring = window - 1 + max_new_per_step
        super().__init__(
            n_layers,
            kv_heads,
            head_dim,
            max_seqs=max_seqs,
            max_len=sinks + self.ring,
            v_head_dim=v_head_dim,
            dtype=dtype,
            device=device,
        )
        # Absolute position held by each slot of each sequence; -1 marks an empty slot.
        self.slot_positions = torch.full(
            (max_seqs, self.capacity), -1, dtype=torch.long, device=self.k.device
        )
        self._ordered: tuple[CacheStep, tuple[Tensor, int] | None] | None = None

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.slot_positions.untyped_storage().nbytes()

    def _claim(self, seq: int) -> None:
        super()._claim(seq)
        self.slot_positions[self._slot[seq]] = -1  # a reused slot must not show old keys

    def _ring_slot(self, positions: Tensor) -> Tensor:
        sinks = self.sinks
        return torch.where(positions < sinks, positions, sinks + (positions - sinks) % self.ring)

    def prepare(self, seq_ids, n_new: int, token_ids: Tensor | None = None) -> CacheStep:
        seq_ids = self._check_step(seq_ids, n_new)
        if n_new > self.max_new_per_step:
            raise ValueError(
                f"n_new={n_new} is more than max_new_per_step={self.max_new_per_step}: the "
                f"ring holds window - 1 old tokens plus at most that many new ones; prefill "
                f"in chunks of at most {self.max_new_per_step} tokens"
            )
        device = self.k.device
        start = torch.tensor([self._lengths[s] for s in seq_ids], device=device)
        self._rows = torch.tensor([self._slot[s] for s in seq_ids], device=device)
        new_pos = start.view(-1, 1) + torch.arange(n_new, device=device)  # (batch, n_new)
        self._write = self._ring_slot(new_pos)
        self.slot_positions[self._rows.view(-1, 1), self._write] = new_pos
        # Position p < capacity sits in slot p, so slots past the longest sequence are empty.
        kv_len = min(self.capacity, int(start.max()) + n_new)
        stored = self.slot_positions[self._rows, :kv_len].unsqueeze(1)  # (batch, 1, kv_len)
        query = new_pos.unsqueeze(-1)  # (batch, n_new, 1)
        visible = (
            (stored >= 0)
            & (stored <= query)
            & ((query - stored < self.window) | (stored < self.sinks))
        )
        mask = None if bool(visible.all()) else from_tensor(visible.unsqueeze(1))
        for seq in seq_ids:
            self._lengths[seq] += n_new
        self.step = CacheStep(seq_ids, start, n_new, kv_len, mask)
        return self.step

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, pattern: Mask | None, backend="auto"
    ) -> Tensor:
        """A step whose sequences start at one position (a prefill chunk, an equal-length
        batch) attends over the keys it sees gathered in position order, the sinks then
        the window, with the window as a pattern at the step's offset: `auto` then skips
        the keys outside each query's band (the banded kernel) where the ring's slot order
        needs a dense mask (5x slower at a 512-token chunk of a 512 window, SmolLM2's
        shape). Other steps, and patterns reaching beyond the cache's window, go through
        `update`, the dense mask and `attention`."""
        ordered = self._ordered_step()
        mask = self._within_window(pattern)
        if ordered is None or mask is None:
            return super().attend(layer, q, k, v, pattern, backend)
        self.update(layer, k, v)
        slots, q_offset = ordered
        rows = self._rows.view(-1, 1)
        k_all, v_all = (t[layer][rows, :, slots].transpose(1, 2) for t in (self.k, self.v))
        return attention(q, k_all, v_all, mask, backend=backend, q_offset=q_offset)

    def _within_window(self, pattern: Mask | None) -> Mask | None:
        """The mask a layer of `pattern` applies over keys in position order: the cache's
        window where it has none, its own where it lies within the cache's (the ring holds
        what it needs); None for any other pattern."""
        if pattern is None:
            return window_and_sinks_mask(self.window, self.sinks)
        return (
            pattern if window_within(window_and_sinks(pattern), self.window, self.sinks) else None
        )

    def _ordered_step(self) -> tuple[Tensor, int] | None:
        """For a step whose sequences all start at one position: the ring slots of the keys
        its queries see, sinks first and then the window in position order, and the query
        offset that keeps the window's distances (the gap between sinks and window left
        out); worked out once per step. None for a ragged step."""
        step = self.step
        if self._ordered is not None and self._ordered[0] is step:
            return self._ordered[1]
        ordered, start = None, step.common_start
        if start is not None:
            first = max(0, start - self.window + 1)  # the first query's oldest window key
            if first <= self.sinks:  # no gap: every position so far
                positions, q_offset = torch.arange(start + step.n_new), start
            else:
                positions = torch.cat(
                    (torch.arange(self.sinks), torch.arange(first, start + step.n_new))
                )
                q_offset = start - first + self.sinks
            ordered = (self._ring_slot(positions.to(self.k.device)), q_offset)
        self._ordered = (step, ordered)
        return ordered

    def decode_storage(self) -> KVStorage | None:
        """The buffers at a decode step, read through a table of the keys the new tokens
        see; subclasses that store otherwise (eviction) lend none."""
        return self._ring_storage() if type(self) is SlidingWindowCache else None

    def _ring_storage(self) -> KVStorage | None:
        """Each slot of the buffer as a block of one token, so that a step's table lists
        exactly the keys a new token sees: sinks first, then its window in position order
        (the new token's own slot last, where it is written). Block `row * ring_stride +
        slot` is `slot` of buffer row `row`; the view spans every row's heads and slots."""
        step = self.step
        if step is None or step.n_new != 1:
            return None
        position = step.start.view(-1, 1)  # of the new token, per sequence
        seen = torch.clamp(position + 1, max=self.sinks + self.window)
        index = torch.arange(int(seen.max()), device=position.device)
        keys = torch.where(index < self.sinks, index, position - (seen - 1 - index))
        keys = torch.where(index < seen, keys, position)  # padding past a short sequence
        k, v = self.k, self.v
        ring_stride = k.stride(1) // k.stride(3)  # blocks per buffer row (K's and V's alike)
        table = self._rows.view(-1, 1) * ring_stride + self._ring_slot(keys)
        blocks = (self.max_seqs - 1) * ring_stride + self.capacity
        views = [
            t.as_strided((t.shape[0], blocks, 1, self.kv_heads, t.shape[4]),
                         (t.stride(0), t.stride(3), t.stride(3), t.stride(2), 1))
            for t in (k, v)
        ]  # fmt: skip
        return KVStorage(*views, table, seen.view(-1) - 1, self.window, self.sinks)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        step = self._check_update(layer, k, v, self.n_layers)
        rows = self._rows.view(-1, 1)
        # Advanced indices on dims 0 and 2 come first: the target is (batch, n_new, heads, dim).
        self.k[layer][rows, :, self._write] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, self._write] = v.transpose(1, 2).to(self.v.dtype)
        view = (layer, self._rows, slice(None), slice(None, step.kv_len))
        return self.k[view], self.v[view]

    def key_positions(self, layer: int) -> Tensor:
        return self.slot_positions[self._rows, : self.step.kv_len]

    def kept_positions(self, seq: int) -> Tensor:
        """Ascending positions that the next token of `seq` will see besides itself."""
        n, stored = self.length(seq), self.slot_positions[self._slot[seq]]
        kept = (stored >= 0) & ((stored < self.sinks) | (stored > n - self.window))
        return stored[kept].sort().values

    def truncate(self, seq: int, length: int) -> None:
        """Roll `seq` back to `length` tokens, if the keys its next query needs are still here.

        The ring keeps the last `ring` positions written; rolling back by at most
        `max_new_per_step` tokens from the longest length reached (or any amount before the
        ring first wraps) always works.
        """
        self._check_truncate(seq, length)
        current = self._lengths[seq]
        stored = self.slot_positions[self._slot[seq]]
        # Asked of the slots themselves, not of `current`: after an earlier rollback the
        # ring may hold positions up to a longer length than the sequence now has.
        oldest = min(length, max(self.sinks, length - self.window + 1))
        needed = torch.arange(oldest, length, device=stored.device)
        lost = needed[stored[self._ring_slot(needed)] != needed]
        if len(lost):
            raise ValueError(
                f"cannot truncate sequence {seq} from {current} to {length} tokens: the next "
                f"query needs the key at position {int(lost[0])}, which the ring no longer "
                f"holds (a later position overwrote it); a window cache can roll back at most "
                f"max_new_per_step={self.max_new_per_step} tokens behind its longest length"
            )
        stored[stored >= length] = -1
        self._lengths[seq] = length

    def fork(self, seq: int) -> int:
        child = super().fork(seq)  # copies K/V (every slot: the ring may have wrapped)
        self.slot_positions[self._slot[child]] = self.slot_positions[self._slot[seq]]
        return child
