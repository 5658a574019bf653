"""The decoding state of linear attention: a fixed-size (S, z) per sequence, layer and KV head.

A linear-attention layer needs no past keys or values, only their running sums
S = Σ φ(k) vᵀ and z = Σ φ(k) (see `attnkit.ops.linear`). So this cache follows the protocol
(`add_sequence`, `prepare`, `fork`, `free`, `truncate`, `nbytes`) but replaces
`update(layer, k, v)` by `state(layer)` and `set_state(layer, S, z)`: each layer reads the
state of the step's sequences, runs from it, and writes the new state back. Memory is
preallocated for `max_seqs` sequences and does not grow with their length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheStep, KVCache, SlotPool
from attnkit.ops.linear import LinearState


class LinearStateCache(KVCache):
    """S `(layers, max_seqs, kv_heads, feat, dv)` and z `(layers, max_seqs, kv_heads, feat)`.

    Each sequence owns a slot (its row in both buffers), zeroed when it is claimed. Bytes
    per sequence: `n_layers · kv_heads · feat · (dv + 1) · itemsize`, whatever its length.
    """

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        feature_dim: int,
        v_head_dim: int,
        *,
        max_seqs: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_layers", n_layers),
            ("kv_heads", kv_heads),
            ("feature_dim", feature_dim),
            ("v_head_dim", v_head_dim),
            ("max_seqs", max_seqs),
        ):
            check_positive_int(name, value)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.n_layers, self.kv_heads = n_layers, kv_heads
        self.feature_dim, self.v_head_dim, self.max_seqs = feature_dim, v_head_dim, max_seqs
        shape = (n_layers, max_seqs, kv_heads, feature_dim)
        self.S = torch.zeros(*shape, v_head_dim, dtype=dtype, device=device)
        self.z = torch.zeros(*shape, dtype=dtype, device=device)
        self._slots = SlotPool(max_seqs)
        self._slot: dict[int, int] = {}
        self._rows: Tensor | None = None  # this step's slots

    @property
    def nbytes(self) -> int:
        return self.S.untyped_storage().nbytes() + self.z.untyped_storage().nbytes()

    def _claim(self, seq: int) -> None:
        slot = self._slots.take()
        self.S[:, slot] = 0  # a reused slot must not carry the previous sequence's state
        self.z[:, slot] = 0
        self._slot[seq] = slot

    def prepare(self, seq_ids, n_new: int, token_ids: Tensor | None = None) -> CacheStep:
        """Advance the sequences by `n_new` tokens; layers then call `state` / `set_state`.

        Sequences of different lengths mix freely: each one's state is its own. The step
        has no mask (there are no key views to hide anything in).
        """
        seq_ids = self._check_step(seq_ids, n_new)
        start = [self._lengths[s] for s in seq_ids]
        for seq, begin in zip(seq_ids, start, strict=True):
            self._lengths[seq] = begin + n_new
        device = self.S.device
        self._rows = torch.tensor([self._slot[s] for s in seq_ids], device=device)
        start_t = torch.tensor(start, device=device)
        self.step = CacheStep(seq_ids, start_t, n_new, max(start) + n_new, None)
        return self.step

    def state(self, layer: int) -> LinearState:
        """(S, z) of this step's sequences at `layer`: `(batch, kv_heads, feat, dv)`, `(..., feat)`.

        Copies (gathered by slot): writing them changes nothing until `set_state`.
        """
        self._check_layer(layer)
        return LinearState(self.S[layer, self._rows], self.z[layer, self._rows])

    def set_state(self, layer: int, S: Tensor, z: Tensor) -> None:
        """Store the state of this step's sequences at `layer` after the step's tokens."""
        step = self._check_layer(layer)
        expected = {
            "S": (step.batch, self.kv_heads, self.feature_dim, self.v_head_dim),
            "z": (step.batch, self.kv_heads, self.feature_dim),
        }
        for name, t in (("S", S), ("z", z)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if tuple(t.shape) != expected[name]:
                raise ValueError(
                    f"{name} must have shape {expected[name]} for this step (batch, kv_heads, "
                    f"feat{', dv' if name == 'S' else ''}), got {tuple(t.shape)}"
                )
        self.S[layer, self._rows] = S.to(self.S.dtype)
        self.z[layer, self._rows] = z.to(self.z.dtype)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        raise TypeError(
            "LinearStateCache keeps a recurrent state, not keys and values: softmax attention "
            "layers cannot use it; linear-attention layers call state() and set_state()"
        )

    def truncate(self, seq: int, length: int) -> None:
        """Allowed only to the current length: a running sum cannot forget tokens."""
        self._check_truncate(seq, length)
        current = self._lengths[seq]
        if length != current:
            raise ValueError(
                f"cannot truncate sequence {seq} from {current} to {length} tokens: a linear-"
                f"attention state is a running sum over all its tokens and keeps no per-token "
                f"keys or values to take out again; fork() the sequence before tokens you may "
                f"want to drop, and continue from the fork"
            )

    def fork(self, seq: int) -> int:
        length = self.length(seq)
        child = self.add_sequence()
        src, dst = self._slot[seq], self._slot[child]
        self.S[:, dst] = self.S[:, src]
        self.z[:, dst] = self.z[:, src]
        self._lengths[child] = length
        return child

    def free(self, seq: int) -> None:
        self._known(seq)
        self._slots.give_back(self._slot.pop(seq))
        del self._lengths[seq]

    def _check_layer(self, layer: int) -> CacheStep:
        if self.step is None or self._rows is None:
            raise RuntimeError("state() before prepare(): call cache.prepare(seq_ids, n_new)")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an integer in [0, {self.n_layers}), got {layer!r}")
        return self.step
