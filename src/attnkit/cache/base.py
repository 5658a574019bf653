"""The one cache protocol every kind of decoding state follows.

A decoding step for a batch of sequences goes:

    step = cache.prepare(seq_ids, n_new)      # reserve room; raises CacheFull, changing nothing
    ... per layer: k_all, v_all = cache.update(layer, k_new, v_new)
    ... attention(q, k_all, v_all, step.mask)  # step.positions feed RoPE

`prepare` advances the sequences' lengths by `n_new`; the K/V for those slots arrive through
`update`, layer by layer. Views are `(batch, kv_heads, kv_len, head_dim)`, where `kv_len`
is the longest sequence of the step; shorter sequences are hidden by `step.mask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.ops.attention import attention
from attnkit.ops.decode_block import KVStorage
from attnkit.ops.masks import Mask, causal, from_tensor, padding
from attnkit.ops.masks.base import Geometry


def cache_call(method, *args, **kwargs):
    """`method(*args, **kwargs)`, a call that reads or writes a cache, outside
    `torch.compile`'s graph while one is being traced (a whole model's forward with a cache,
    or a layer's cache calls when blocks are compiled one by one): a cache's bookkeeping is
    Python state and its buffers are written in place, which dynamo traced into a wrong view
    (an AssertionError inside torch's functionalization). Eagerly, a plain call."""
    if torch.compiler.is_compiling():
        return _eagerly(method, *args, **kwargs)
    return method(*args, **kwargs)


@torch.compiler.disable(reason="a cache's state is Python's, and its buffers are written in place")
def _eagerly(method, *args, **kwargs):
    return method(*args, **kwargs)


class CacheFull(RuntimeError):
    """Not enough cache capacity for the request; nothing was changed.

    `per_sequence`: the limit is each sequence's own (a cache's `max_len`, `available`
    positions): freeing other sequences makes no room, unlike a pool's blocks or a cache's
    sequence slots.
    """

    def __init__(
        self, message: str, *, needed: int = 0, available: int = 0, per_sequence: bool = False
    ) -> None:
        super().__init__(message)
        self.needed, self.available, self.per_sequence = needed, available, per_sequence


@dataclass(frozen=True)
class CacheStep:
    """What one forward pass through the cache needs: who, where, and what may be seen."""

    seq_ids: tuple[int, ...]
    start: Tensor  # (batch,) each sequence's length before this step
    n_new: int
    kv_len: int  # keys in this step's views: max over the batch of start + n_new
    mask: Mask | None  # for attention(q, k_view, v_view); None: every key visible

    @cached_property  # every layer's RoPE and mask asks; computed once per step
    def positions(self) -> Tensor:
        """(batch, n_new) absolute positions of the new tokens (RoPE uses them)."""
        return self.start.unsqueeze(1) + torch.arange(self.n_new, device=self.start.device)

    @cached_property
    def common_start(self) -> int | None:
        """The position every sequence of the step starts at; None for a ragged step."""
        first = int(self.start[0])
        return first if bool((self.start == first).all()) else None

    @property
    def batch(self) -> int:
        return len(self.seq_ids)


def causal_step_mask(start: Tensor, n_new: int, kv_len: int) -> Mask | None:
    """Mask for new tokens written right after each sequence's `start` keys.

    Keys are stored from slot 0, so sequence b's query i (position start_b + i) sees slots
    j <= start_b + i. Equal lengths reduce to bottom-right `causal()` (or nothing to hide,
    for one new token); a ragged decode step (one new token each) is key `padding`, which
    the decode kernels read as a length per sequence; other ragged steps get a dense
    `(batch, 1, n_new, kv_len)` mask.
    """
    if bool((start == start[0]).all()) and int(start[0]) + n_new == kv_len:
        return None if n_new == 1 else causal()
    if n_new == 1:
        return padding(start + 1)
    rows = start.view(-1, 1, 1) + torch.arange(n_new, device=start.device).view(1, -1, 1)
    keys = torch.arange(kv_len, device=start.device).view(1, 1, -1)
    return from_tensor((keys <= rows).unsqueeze(1))


def narrow_mask(mask: Mask | None, pattern: Mask | None) -> Mask | None:
    """A causal step `mask` narrowed to a layer's own `pattern` (a window, a sparse layout).

    The pattern replaces causal masking: where `mask` is plain causal (or hides nothing), the
    pattern alone is the answer, so backends see one leaf mask they can summarise exactly.
    """
    if pattern is None:
        return mask
    if mask is None or mask == causal():
        return pattern
    return mask & pattern


class SlotPool:
    """Which of a cache's `size` preallocated per-sequence slots are free; lowest first.

    A new sequence takes a slot (`CacheFull` when none is left); `free` gives it back.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = list(range(size))

    def take(self) -> int:
        if not self._free:
            raise CacheFull(f"all {self.size} sequence slots are in use", needed=1)
        return self._free.pop(0)

    def give_back(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort()


class KVCache:
    """Base of every cache: sequence bookkeeping plus the protocol methods."""

    # Caches that choose what to keep by attention mass (H2O) set this; attention layers
    # then pass each step's queries to `record_queries` before `update`.
    wants_queries: bool = False
    # The most tokens one `prepare` may add per sequence (ring buffers); None: no limit.
    # `Transformer.forward` splits longer inputs into steps of this size.
    max_step_tokens: int | None = None
    # True where what attention reads for a token does not depend on how the prompt was
    # split into steps, so a prompt fed in pieces computes what it would whole
    # (`Transformer.forward` splits long prefills on CPU). Each class says so itself (see
    # __init_subclass__): a subclass that evicts or rounds differently must not inherit it.
    exact_in_pieces: bool = False
    # True where `truncate` can take back any token of the last step, leaving the cache as if
    # it had never been written: the scheduler then prefills short prompts together in
    # right-padded rows, and cuts the padding off. Each class says so itself, as above.
    undoes_last_step: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.exact_in_pieces = cls.__dict__.get("exact_in_pieces", False)
        cls.undoes_last_step = cls.__dict__.get("undoes_last_step", False)

    def __init__(self) -> None:
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self.step: CacheStep | None = None

    # -- sequences ----------------------------------------------------------------------
    def add_sequence(self, token_ids=None) -> int:
        """A new, empty sequence; returns its id.

        `token_ids` (the prompt) lets caches that share prefixes (paged) start the sequence
        with already cached blocks; `length(seq)` then says how many tokens were reused.
        """
        seq = self._next_id
        self._claim(seq)  # CacheFull uses up no id: a LayeredCache's groups stay in step
        self._next_id += 1
        self._lengths[seq] = 0
        return seq

    def _withdraw(self, seq: int) -> None:
        """Free `seq`, the sequence added last, and hand its id out again: what an
        all-or-nothing add across caches (`LayeredCache`) does with the groups that took a
        sequence when a later one could not."""
        if seq != self._next_id - 1:
            raise RuntimeError(f"sequence {seq} is not the one added last ({self._next_id - 1})")
        self.free(seq)
        self._next_id = seq

    def reusable_length(self, token_ids) -> int:
        """How many tokens `add_sequence(token_ids)` would start from, changing nothing:
        0 here; caches that share prefixes (paged) say what they have cached."""
        return 0

    def length(self, seq: int) -> int:
        """Tokens cached for `seq`."""
        return self._lengths[self._known(seq)]

    @property
    def sequences(self) -> list[int]:
        return list(self._lengths)

    def _known(self, seq: int) -> int:
        if seq not in self._lengths:
            raise KeyError(f"sequence {seq!r} is not in this cache (known: {self.sequences})")
        return seq

    # -- protocol (subclasses implement) ------------------------------------------------
    def prepare(
        self, seq_ids: list[int] | tuple[int, ...], n_new: int, token_ids: Tensor | None = None
    ) -> CacheStep:
        """Reserve `n_new` slots for each sequence; the step every layer's update uses.

        `token_ids` `(batch, n_new)`, when given, are the tokens being cached; caches that
        share prefixes between requests (paged) hash them, the others ignore them.
        """
        raise NotImplementedError

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's `(batch, kv_heads, n_new, head_dim)` K/V; return the views."""
        raise NotImplementedError

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, pattern: Mask | None, backend="auto"
    ) -> Tensor:
        """Store this step's K/V for `layer` and return `q`'s attention over all it holds.

        The default is `update`, `layer_mask(layer, pattern)` and `attnkit.attention`; a
        cache that can attend straight from its own storage (a paged pool read through its
        block table at decode) overrides this to skip building the views.
        """
        k_all, v_all = self.update(layer, k, v)
        return attention(q, k_all, v_all, self.layer_mask(layer, pattern), backend=backend)

    def decode_storage(self) -> KVStorage | None:
        """The current step's K/V storage, for a kernel that runs every layer of a decode
        step itself (`ops.decode_block.DecodeStack`), or None: the step must go through
        `update`/`attend` layer by layer.

        A cache offers it only for a step of one new token per sequence whose K/V it stores
        as the kernel reads them: every key in order (contiguous and paged K/V, int8 rows
        with their scales), or a table of the keys its window keeps (ring buffers). The
        kernel writes every layer's new K/V; the caller then says so with
        `stored_every_layer()`.
        """
        return None

    def stored_every_layer(self) -> None:
        """Hook: a kernel wrote this step's K/V for every layer through `decode_storage`."""

    def record_queries(self, layer: int, q: Tensor) -> None:
        """This step's queries `(batch, heads, n_new, head_dim)` (after RoPE), if wanted."""

    def key_positions(self, layer: int) -> Tensor | None:
        """`(batch, kv_len)` absolute positions of this step's key slots for `layer` (-1: empty).

        None means slot j holds position j (caches that store every token in order); ring
        buffers and eviction caches, which reuse slots, say where each key came from.
        """
        return None

    def layer_mask(self, layer: int, pattern: Mask | None = None) -> Mask | None:
        """This step's mask for `layer`, narrowed to the layer's own `pattern` if it has one.

        The pattern (e.g. `sliding_window(W) | sinks(S)`, `strided(s)`) is evaluated at the
        tokens' absolute positions, so it means the same with or without a cache. Equal-length
        batches over in-order slots keep the pattern as a mask value (tile skipping works);
        otherwise a dense `(batch, 1, n_new, kv_len)` mask is built.
        """
        step = self.step
        if step is None:
            raise RuntimeError("layer_mask() before prepare(): call cache.prepare(seq_ids, n_new)")
        keys = self.key_positions(layer)
        if pattern is None or (keys is None and step.mask in (None, causal())):
            return narrow_mask(step.mask, pattern)
        device = step.start.device
        if keys is None:
            keys = torch.arange(step.kv_len, device=device).expand(step.batch, -1)
        batch = torch.arange(step.batch, device=device).view(-1, 1, 1)
        geometry = Geometry(step.n_new, step.kv_len, 0)  # indices below are absolute positions
        keys = keys.unsqueeze(1)  # (batch, 1, kv_len)
        visible = pattern.to(device).allowed(batch, step.positions.unsqueeze(-1), keys, geometry)
        if step.mask is not None:
            visible = visible & step.mask.dense(step.n_new, step.kv_len, device=device)[:, 0]
        visible = visible & (keys >= 0)
        return from_tensor(visible.unsqueeze(1))

    def truncate(self, seq: int, length: int) -> None:
        """Keep only the first `length` tokens of `seq` (speculative-decoding rollback)."""
        raise NotImplementedError

    def fork(self, seq: int) -> int:
        """A new sequence whose cached tokens equal `seq`'s; returns its id."""
        raise NotImplementedError

    def free(self, seq: int) -> None:
        """Forget `seq` and return its memory."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of storage this cache holds allocated right now."""
        raise NotImplementedError

    def _claim(self, seq: int) -> None:
        """Hook: give a new sequence its storage (raise CacheFull if there is none)."""

    # -- shared checks -----------------------------------------------------------------
    def _check_step(self, seq_ids, n_new: int) -> tuple[int, ...]:
        seq_ids = tuple(seq_ids)
        if not seq_ids:
            raise ValueError("seq_ids must name at least one sequence, got none")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"seq_ids must not repeat a sequence, got {list(seq_ids)}")
        for seq in seq_ids:
            self._known(seq)
        check_positive_int("n_new", n_new)
        return seq_ids

    def _check_update(self, layer: int, k: Tensor, v: Tensor, n_layers: int) -> CacheStep:
        step = self.step
        if step is None:
            raise RuntimeError("update() before prepare(): call cache.prepare(seq_ids, n_new)")
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer must be in [0, {n_layers}), got {layer}")
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or t.shape[0] != step.batch or t.shape[2] != step.n_new:
                raise ValueError(
                    f"{name} must be (batch={step.batch}, kv_heads, n_new={step.n_new}, head_dim) "
                    f"for this step, got {tuple(t.shape)}"
                )
        return step

    def _check_truncate(self, seq: int, length: int) -> None:
        current = self.length(seq)
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= current:
            raise ValueError(
                f"length must be an integer in [0, {current}] for sequence {seq}, got {length!r}"
            )
