"""One cache per group of layers, behind the one protocol: hybrid models' decoding state.

Models that mix attention kinds keep different state per layer: Gemma-2 and Mistral-style
alternation keeps a ring buffer for its windowed layers and full K/V for its global ones.
`LayeredCache` routes each layer to its group's cache and keeps the groups' sequences in
lockstep, so the model, `generate` and the scheduler see a single cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from attnkit.cache.base import CacheFull, CacheStep, KVCache
from attnkit.ops.masks import Mask


class LayeredCache(KVCache):
    """`groups`: `(layers, cache)` pairs; `cache` holds those layers, numbered from 0.

    Layer `groups[g][0][i]` of the model is layer `i` of `groups[g][1]`. The groups must
    cover layers `0 .. n-1` exactly once and start empty. `nbytes` is their sum; `step`
    is the first group's (positions are the same in every group; masks are per layer, from
    `layer_mask`).
    """

    def __init__(self, groups: Sequence[tuple[Sequence[int], KVCache]]) -> None:
        super().__init__()
        if not groups:
            raise ValueError("groups must hold at least one (layers, cache) pair, got none")
        self._route: dict[int, tuple[KVCache, int]] = {}
        for layers, cache in groups:
            if not isinstance(cache, KVCache):
                raise TypeError(f"each group needs a KVCache, got {type(cache).__name__}")
            if cache.sequences:
                raise ValueError(f"each group's cache must start empty, {cache!r} holds some")
            for local, layer in enumerate(layers):
                if layer in self._route:
                    raise ValueError(f"layer {layer} is in more than one group")
                self._route[layer] = (cache, local)
        n = len(self._route)
        if sorted(self._route) != list(range(n)):
            raise ValueError(f"groups must cover layers 0..{n - 1}, got {sorted(self._route)}")
        self.caches = [cache for _, cache in groups]
        self.wants_queries = any(cache.wants_queries for cache in self.caches)
        self.exact_in_pieces = all(cache.exact_in_pieces for cache in self.caches)
        self.undoes_last_step = all(cache.undoes_last_step for cache in self.caches)
        limits = [c.max_step_tokens for c in self.caches if c.max_step_tokens is not None]
        self.max_step_tokens = min(limits) if limits else None
        sizes = {getattr(cache, "block_size", None) for cache in self.caches}
        if len(sizes) == 1 and None not in sizes:
            # paged groups of one block size: a sequence takes its blocks in each of them
            # alike (the scheduler batches prefills by this; a windowed group may need fewer)
            self.block_size = sizes.pop()

    @property
    def n_layers(self) -> int:
        return len(self._route)

    def route(self, layer: int) -> tuple[KVCache, int]:
        """The group cache holding model layer `layer`, and its index there."""
        if layer not in self._route:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        return self._route[layer]

    # -- sequences: every group holds the same ids, created and ended together ------------
    def add_sequence(self, token_ids=None) -> int:
        prompt = self._common_prefix_prompt(token_ids)
        seq = self._next_id  # every group hands this id out next; taken once they all have
        added: list[KVCache] = []
        try:
            for cache in self.caches:
                if cache.add_sequence(prompt) != seq:
                    raise RuntimeError(f"group caches fell out of step at sequence {seq}")
                added.append(cache)
        except CacheFull:  # all or nothing, the id included: the groups stay in step
            for cache in added:
                cache._withdraw(seq)
            raise
        super().add_sequence()  # takes `seq`
        reused = {cache.length(seq) for cache in self.caches}
        if len(reused) != 1:  # `reusable_length` and `add_sequence` disagree somewhere
            raise RuntimeError(f"groups reused {sorted(reused)} tokens of sequence {seq}")
        self._lengths[seq] = reused.pop()
        return seq

    def _common_prefix_prompt(self, token_ids):
        """`token_ids` cut so that every group reuses the same cached prefix: the longest
        all of them hold. Groups that share prefixes (paged) may start with cached tokens,
        the others can't; a paged group with a window may hold a long prefix without a
        shorter one (its blocks behind the window gone), so the cut is found by asking
        again until the groups agree, rather than by cutting the longer ones back."""
        if token_ids is None:
            return None
        prompt = token_ids
        while True:
            lengths = [cache.reusable_length(prompt) for cache in self.caches]
            common = min(lengths)
            if common == max(lengths):
                return prompt
            prompt = prompt[: common + 1]  # at most `common` tokens reusable from it

    def prepare(self, seq_ids, n_new: int, token_ids: Tensor | None = None) -> CacheStep:
        seq_ids = self._check_step(seq_ids, n_new)
        before = {seq: self._lengths[seq] for seq in seq_ids}
        steps: list[CacheStep] = []
        try:
            for cache in self.caches:
                steps.append(cache.prepare(seq_ids, n_new, token_ids))
        except CacheFull:  # all or nothing: undo the groups that already reserved room
            for cache in self.caches[: len(steps)]:
                for seq, length in before.items():
                    cache.truncate(seq, length)
            raise
        for seq in seq_ids:
            self._lengths[seq] += n_new
        self.step = steps[0]
        return self.step

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        cache, local = self.route(layer)
        return cache.update(local, k, v)

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, pattern: Mask | None, backend="auto"
    ) -> Tensor:
        """The layer's group attends its own way (a paged pool in place at decode, a ring
        over its keys in position order), not through views and a dense mask."""
        cache, local = self.route(layer)
        return cache.attend(local, q, k, v, pattern, backend)

    def stored_every_layer(self) -> None:
        """A one-call decode step wrote every group's layers (through each group's
        `decode_storage`; the `LayeredCache` itself lends none)."""
        for cache in self.caches:
            cache.stored_every_layer()

    def record_queries(self, layer: int, q: Tensor) -> None:
        cache, local = self.route(layer)
        if cache.wants_queries:
            cache.record_queries(local, q)

    def key_positions(self, layer: int) -> Tensor | None:
        cache, local = self.route(layer)
        return cache.key_positions(local)

    def layer_mask(self, layer: int, pattern: Mask | None = None) -> Mask | None:
        cache, local = self.route(layer)
        return cache.layer_mask(local, pattern)

    def truncate(self, seq: int, length: int) -> None:
        self._check_truncate(seq, length)
        # Caches with a bounded memory (rings, eviction) may refuse a rollback; ask them
        # first, so a refusal leaves every group unchanged.
        bounded = [c for c in self.caches if c.max_step_tokens is not None]
        for cache in bounded + [c for c in self.caches if c.max_step_tokens is None]:
            cache.truncate(seq, length)
        self._lengths[seq] = length

    def fork(self, seq: int) -> int:
        self._known(seq)
        child = super().add_sequence()
        forked: list[KVCache] = []
        try:
            for cache in self.caches:
                if cache.fork(seq) != child:
                    raise RuntimeError(f"group caches fell out of step forking sequence {seq}")
                forked.append(cache)
        except CacheFull:
            for cache in forked:
                cache.free(child)
            del self._lengths[child]
            raise
        self._lengths[child] = self._lengths[seq]
        return child

    def free(self, seq: int) -> None:
        self._known(seq)
        for cache in self.caches:
            cache.free(seq)
        del self._lengths[seq]

    @property
    def num_free_blocks(self) -> int:
        """The blocks a step may take in the fullest group (every group must be paged:
        `block_size` is set only then, and the scheduler asks only then)."""
        return min(cache.num_free_blocks for cache in self.caches)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.caches)
