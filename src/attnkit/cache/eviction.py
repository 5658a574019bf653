"""Caches that keep a fixed token budget per sequence and evict the rest.

- `StreamingLLMCache` (Xiao et al. 2023): the first `sinks` tokens plus the most recent
  ones; a configuration of `SlidingWindowCache`.
- `H2OCache` (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
  Large Language Models", 2023): the `recent` most recent tokens plus the `budget - recent`
  tokens that have received the most attention so far, chosen per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheStep, causal_step_mask
from attnkit.cache.contiguous import ContiguousCache
from attnkit.cache.window import SlidingWindowCache
from attnkit.ops.decode_block import KVStorage


def _check_budget(budget: int, keep: int, keep_name: str) -> None:
    check_positive_int("budget", budget)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"{keep_name} must be an integer >= 0, got {keep!r}")
    if keep > budget:
        raise ValueError(f"{keep_name} ({keep}) must be <= budget ({budget})")


class StreamingLLMCache(SlidingWindowCache):
    """Keeps the first `sinks` tokens and the most recent `budget - sinks` between steps.

    A new token sees those `budget` tokens and itself: `sliding_window(budget - sinks + 1)
    | sinks(sinks)`. Other arguments as `SlidingWindowCache`; storage holds
    `budget + max_new_per_step` tokens per sequence (room for a step's new tokens).
    """

    undoes_last_step = True  # a configuration of the ring, rolled back as it is

    def __init__(
        self, n_layers: int, kv_heads: int, head_dim: int, *, budget: int, sinks: int = 4, **kwargs
    ) -> None:
        _check_budget(budget, sinks, "sinks")
        self.budget = budget
        super().__init__(
            n_layers, kv_heads, head_dim, window=budget - sinks + 1, sinks=sinks, **kwargs
        )

    def decode_storage(self) -> KVStorage | None:
        return self._ring_storage()  # a configuration of the ring, stored the same way


class H2OCache(ContiguousCache):
    """Keeps `recent` recent tokens plus the heaviest `budget - recent` by attention mass.

    Each layer scores its own tokens: the mass of a token is the softmax weight it has
    received, summed over query heads and over every query of every step so far (the
    cache computes these weights itself from the queries handed to `record_queries`, with
    `scale`, default `head_dim ** -0.5`, as the attention layer does). After each step's
    update a layer holding more than `budget` tokens of a sequence drops the lightest ones.

    Kept tokens are packed, in position order, into slots `[0, kept)`, with a step's new
    tokens after them; every kept token is in the past of every new one, so the step's
    mask is `causal_step_mask` over slots. Storage per layer is `(max_seqs, kv_heads,
    budget + max_new_per_step, head_dim)` for K and V, plus the position (int64) and mass
    of each slot; `nbytes` counts all four and does not grow with length. Rolling back
    (`truncate`) is refused: evicted tokens and the mass the dropped tokens' queries gave
    are gone.
    """

    wants_queries = True

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        budget: int,
        recent: int,
        max_seqs: int = 1,
        max_new_per_step: int = 512,
        scale: float | None = None,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_budget(budget, recent, "recent")
        check_positive_int("max_new_per_step", max_new_per_step)
        self.budget, self.recent, self.max_new_per_step = budget, recent, max_new_per_step
        self.max_step_tokens = max_new_per_step
        super().__init__(
            n_layers,
            kv_heads,
            head_dim,
            max_seqs=max_seqs,
            max_len=budget + max_new_per_step,
            v_head_dim=v_head_dim,
            dtype=dtype,
            device=device,
        )
        self.scale = head_dim**-0.5 if scale is None else scale
        shape = (n_layers, max_seqs, self.capacity)
        self.slot_positions = torch.full(shape, -1, dtype=torch.long, device=self.k.device)
        mass_dtype = torch.promote_types(dtype, torch.float32)
        self.mass = torch.zeros(shape, dtype=mass_dtype, device=self.k.device)
        self._queries: dict[int, Tensor] = {}

    @property
    def nbytes(self) -> int:
        extra = (
            self.slot_positions.untyped_storage().nbytes() + self.mass.untyped_storage().nbytes()
        )
        return super().nbytes + extra

    def _claim(self, seq: int) -> None:
        super()._claim(seq)
        self.slot_positions[:, self._slot[seq]] = -1
        self.mass[:, self._slot[seq]] = 0

    def kept_positions(self, seq: int, layer: int) -> Tensor:
        """Ascending positions of the tokens `layer` keeps for `seq`."""
        stored = self.slot_positions[layer, self._slot[self._known(seq)]]
        return stored[stored >= 0]

    def prepare(self, seq_ids, n_new: int, token_ids: Tensor | None = None) -> CacheStep:
        seq_ids = self._check_step(seq_ids, n_new)
        if n_new > self.max_new_per_step:
            raise ValueError(
                f"n_new={n_new} is more than max_new_per_step={self.max_new_per_step}; "
                f"prefill in chunks of at most {self.max_new_per_step} tokens"
            )
        device = self.k.device
        start = torch.tensor([self._lengths[s] for s in seq_ids], device=device)
        kept = start.clamp(max=self.budget)  # every layer keeps exactly this many
        kv_len = int(kept.max()) + n_new
        mask = causal_step_mask(kept, n_new, kv_len)
        # ContiguousCache.update writes at `step.positions`: here, the slots after the kept.
        self._slot_step = CacheStep(seq_ids, kept, n_new, kv_len, mask)
        rows = torch.tensor([self._slot[s] for s in seq_ids], device=device).view(-1, 1)
        new = torch.arange(n_new, device=device)
        self.slot_positions[:, rows, kept.view(-1, 1) + new] = start.view(-1, 1) + new
        for seq in seq_ids:
            self._lengths[seq] += n_new
        self._queries.clear()
        self.step = CacheStep(seq_ids, start, n_new, kv_len, mask)
        return self.step

    def record_queries(self, layer: int, q: Tensor) -> None:
        step = self.step
        if step is None:
            raise RuntimeError("record_queries() before prepare(): call cache.prepare first")
        if (
            q.dim() != 4
            or (q.shape[0], q.shape[2], q.shape[3]) != (step.batch, step.n_new, self.head_dim)
            or q.shape[1] % self.kv_heads
        ):
            raise ValueError(
                f"q must be (batch={step.batch}, heads (a multiple of {self.kv_heads}), "
                f"n_new={step.n_new}, head_dim={self.head_dim}), got {tuple(q.shape)}"
            )
        self._queries[layer] = q

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        step = self._check_update(layer, k, v, self.n_layers)
        if layer not in self._queries:
            raise RuntimeError(
                f"H2OCache needs layer {layer}'s queries of this step before update(): call "
                "record_queries(layer, q) (attention layers do when cache.wants_queries)"
            )
        k_all, v_all = super().update(layer, k, v)
        # Eviction below rewrites the storage these views may alias.
        k_all, v_all = k_all.clone(), v_all.clone()
        rows = torch.tensor([self._slot[s] for s in step.seq_ids], device=k.device)
        self._view_positions = self.slot_positions[layer, rows, : step.kv_len].clone()
        self._accumulate(layer, self._queries.pop(layer), k_all)
        for row, seq in enumerate(step.seq_ids):
            self._evict(layer, self._slot[seq], int(self._slot_step.start[row]) + step.n_new)
        return k_all, v_all

    def key_positions(self, layer: int) -> Tensor:
        """Positions of the keys `update(layer, …)` just returned (before it evicted)."""
        return self._view_positions

    def _storage_start(self, step: CacheStep) -> Tensor:
        return self._slot_step.start  # kept tokens are packed; new ones follow them

    def _accumulate(self, layer: int, q: Tensor, k_all: Tensor) -> None:
        """Add this step's softmax weights, summed over heads and queries, to each slot."""
        step, dtype = self._slot_step, self.mass.dtype
        b, heads, n, d = q.shape
        group = heads // self.kv_heads
        # (B, H, n, d) -> (B, H_kv, G·n, d): query head h uses KV head h // G.
        folded = q.reshape(b, self.kv_heads, group * n, d).to(dtype)
        scores = folded @ k_all.to(dtype).transpose(-1, -2) * self.scale
        if step.mask is not None:
            allowed = step.mask.dense(n, step.kv_len, device=q.device).repeat(1, 1, group, 1)
            scores = scores.masked_fill(~allowed, -torch.inf)  # also hides NaN in empty slots
        rows = torch.tensor([self._slot[s] for s in step.seq_ids], device=q.device)
        self.mass[layer, rows, : step.kv_len] += scores.softmax(-1).sum(dim=(1, 2))

    def _evict(self, layer: int, slot: int, held: int) -> None:
        """Pack the `budget` kept tokens of slots `[0, held)` into `[0, budget)`, in order."""
        if held <= self.budget:
            return
        older = held - self.recent  # heavy hitters come from before the recent tokens
        heavy = self.mass[layer, slot, :older].topk(self.budget - self.recent).indices
        keep = torch.cat([heavy.sort().values, torch.arange(older, held, device=heavy.device)])
        for store in (self.k[layer, slot], self.v[layer, slot]):  # (kv_heads, capacity, d)
            store[:, : self.budget] = store[:, keep]
        for table, empty in ((self.slot_positions, -1), (self.mass, 0)):
            table[layer, slot, : self.budget] = table[layer, slot, keep]
            table[layer, slot, self.budget :] = empty

    def truncate(self, seq: int, length: int) -> None:
        """Only a no-op truncation: H2O's evictions and masses cannot be undone."""
        self._check_truncate(seq, length)
        if length != self._lengths[seq]:
            raise ValueError(
                f"H2OCache cannot roll sequence {seq} back from {self._lengths[seq]} to "
                f"{length} tokens: tokens it evicted are gone and the dropped tokens' "
                "queries already added to the attention mass that chose them"
            )

    def fork(self, seq: int) -> int:
        child = super().fork(seq)  # copies K/V
        src, dst = self._slot[seq], self._slot[child]
        self.slot_positions[:, dst] = self.slot_positions[:, src]
        self.mass[:, dst] = self.mass[:, src]
        return child
