"""Paged K/V cache: one pool of fixed-size blocks shared by every sequence (PagedAttention).

Each sequence owns a block table, the list of blocks holding its tokens in order: token t
lives in block `table[t // block_size]` at offset `t % block_size`. Memory is taken a block
at a time as tokens arrive and given back when a sequence is truncated or freed. Forks
share blocks by reference count and copy a block only when one of them writes into it
(copy-on-write). Full blocks whose token ids are known are indexed by a chain hash, so a
new request with the same prompt prefix starts from those blocks instead of recomputing
them (prefix caching). See Kwon et al., "Efficient Memory Management for Large Language
Model Serving with PagedAttention" (2023), and nano-vllm's block manager.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field
from itertools import accumulate

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheFull, CacheStep, KVCache, causal_step_mask
from attnkit.cache.block_pool import BlockPool, chain_hash
from attnkit.ops.attention import attention
from attnkit.ops.decode_block import KVStorage
from attnkit.ops.masks import Mask, window_and_sinks, window_and_sinks_mask, window_within
from attnkit.ops.paged_decode import check_window, choose_paged_backend, paged_decode

GIVEN_BACK = -1  # a block table entry whose block a windowed cache gave back


@dataclass(frozen=True)
class PagedStep(CacheStep):
    """A `CacheStep` plus where its tokens live in the pool (paged kernels can read these)."""

    block_table: Tensor  # (batch, ceil(kv_len / block_size)); short rows padded with block 0
    slot_blocks: Tensor  # (batch, n_new) block of each new token
    slot_offsets: Tensor  # (batch, n_new) offset of each new token inside its block


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)  # GIVEN_BACK where out of the window
    tokens: list[int] = field(default_factory=list)  # known token ids: a prefix of the sequence
    hashes: list[bytes] = field(default_factory=list)  # chain hash of each full known block


class PagedCache(KVCache):
    """K/V of every layer in `(n_layers, num_blocks, block_size, kv_heads, head_dim)` pools.

    A block id covers the same token range in every layer. Blocks-then-tokens layout means a
    gather by block table gives `(batch, n_blocks * block_size, kv_heads, d)` contiguous, and
    `.transpose(1, 2)` is the attention view without a second copy. `prepare` is
    all-or-nothing: if the batch's new blocks and copy-on-write copies do not fit, it raises
    `CacheFull` and changes nothing. `seed` shuffles the free list (tests).

    `block_size` trades memory and prefix sharing (both by whole blocks) against decode speed
    on a CPU, where the kernel reads a block's tokens as one run: blocks of under ~48 KiB of
    K per layer read slower once the pool's blocks are out of order (SmolLM2-135M, 768 bytes
    a token: 16-token blocks at 0.65-0.69x of a contiguous cache's speed, 64-token ones at
    0.85-0.89x; README, "Choosing `block_size` on a CPU").

    `window` (and `sinks`): layers see at most each token's last `window` tokens and the
    first `sinks`, `sliding_window(window) | sinks(sinks)`: a layer's own narrower window
    applies as it is, any other pattern is narrowed to the cache's (the window applies to
    every layer, as a `SlidingWindowCache`'s does). Give a windowed model (Mistral) its own
    window here. Each step then first gives back the blocks that lie wholly between a
    sequence's sinks and the window of its first new token, which no later step can see
    (vLLM's sliding-window block manager): a sequence holds about `(window + n_new) /
    block_size + 2` blocks (plus its sinks') however long it grows. Their table entries
    read `GIVEN_BACK` (-1 in `block_table`; block 0, masked out, in a step's tensors, so
    `update`'s views hold junk there). `truncate` back into what was given back raises (a
    rollback of the last step's tokens always works).
    """

    exact_in_pieces = True  # every token's K/V kept as written
    undoes_last_step = True  # its blocks go back to the pool (a window's gap is behind it)

    def __init__(
        self,
        n_layers: int,
        kv_heads: int,
        head_dim: int,
        *,
        num_blocks: int,
        block_size: int = 16,
        v_head_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        seed: int | None = None,
        window: int | None = None,
        sinks: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("n_layers", n_layers),
            ("kv_heads", kv_heads),
            ("head_dim", head_dim),
            ("num_blocks", num_blocks),
            ("block_size", block_size),
        ):
            check_positive_int(name, value)
        if v_head_dim is not None:
            check_positive_int("v_head_dim", v_head_dim)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        check_window(window, sinks)
        self.window, self.sinks = None if window is None else int(window), int(sinks)
        if window is not None:
            # `Transformer.forward` feeds a long prefill in pieces only into caches it can
            # take them back from, should a piece fail; a window gives blocks back on the way
            self.exact_in_pieces = False
        self.n_layers, self.kv_heads, self.head_dim = n_layers, kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (n_layers, num_blocks, block_size, kv_heads)
        self.k_pool = torch.zeros(*shape, head_dim, dtype=dtype, device=device)
        self.v_pool = torch.zeros(*shape, self.v_head_dim, dtype=dtype, device=device)
        self.pool = BlockPool(num_blocks, seed=seed)
        self._seqs: dict[int, _Sequence] = {}
        # Full blocks written by the current step, indexed only once every layer holds their
        # K/V: a step abandoned half-way must not leave lookups pointing at garbage.
        self._pending: list[tuple[int, bytes]] = []
        self._layers_written: set[int] = set()
        self._spans: tuple[CacheStep | None, dict] = (None, {})  # see _window_span

    # -- accounting ---------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.k_pool.untyped_storage().nbytes() + self.v_pool.untyped_storage().nbytes()

    @property
    def block_nbytes(self) -> int:
        """Bytes one block takes across all layers, K and V."""
        return self.nbytes // self.num_blocks

    @property
    def used_nbytes(self) -> int:
        """Bytes of the blocks sequences reference now (whole blocks, shared ones once)."""
        return self.pool.num_used * self.block_nbytes

    @property
    def num_free_blocks(self) -> int:
        """Blocks a step may take now: free ones plus cached ones it may evict."""
        return self.pool.num_available

    def block_table(self, seq: int) -> list[int]:
        """`seq`'s blocks in token order; `GIVEN_BACK` (-1) for those a window gave back."""
        return list(self._seqs[self._known(seq)].blocks)

    # -- sequences ----------------------------------------------------------------------
    def add_sequence(self, token_ids: Tensor | list[int] | None = None) -> int:
        """A new sequence; with its prompt's `token_ids`, it starts from cached prefix blocks.

        The longest run of full prompt blocks found in the prefix index is shared, leaving at
        least one prompt token to compute (the caller needs its logits); `length(seq)` is the
        number of tokens reused, and the caller prefills `token_ids[length(seq):]`. With a
        window, only the blocks the next token sees need to be found (its sinks' and its
        window's): the others start given back.
        """
        prompt = None if token_ids is None else _token_row(token_ids, "token_ids")
        seq = super().add_sequence()
        state = self._seqs[seq] = _Sequence()
        if prompt:
            bs, keys = self.block_size, self._prompt_keys(prompt)
            reused = self._reusable_blocks(keys)
            gap = self._window_gap(reused * bs)
            for i, key in enumerate(keys[:reused]):
                if i in gap:
                    state.blocks.append(GIVEN_BACK)
                    continue
                block = self.pool.lookup(key)
                self.pool.share(block)
                state.blocks.append(block)
            state.hashes, state.tokens = keys[:reused], prompt[: reused * bs]
        self._lengths[seq] = len(state.tokens)
        return seq

    def reusable_length(self, token_ids) -> int:
        """How many tokens `add_sequence(token_ids)` would reuse from the prefix index."""
        prompt = None if token_ids is None else _token_row(token_ids, "token_ids")
        if not prompt:
            return 0
        return self._reusable_blocks(self._prompt_keys(prompt)) * self.block_size

    def _prompt_keys(self, prompt: list[int]) -> list[bytes]:
        """The chain hashes of the full blocks of `prompt` a sequence may start from: all but
        its last token (whose logits the caller needs computed)."""
        bs, keys = self.block_size, []
        for i in range((len(prompt) - 1) // bs):
            keys.append(chain_hash(keys[-1] if i else b"", prompt[i * bs : (i + 1) * bs]))
        return keys

    def _reusable_blocks(self, keys: list[bytes]) -> int:
        """How many of a prompt's full blocks (chain hashes `keys`) a new sequence can start
        from: the longest run whose blocks are all indexed; with a window, the longest run
        whose blocks the next token sees (the sinks' and the window's) are, the others
        needing no K/V (so a long conversation's next turn is found after its early blocks
        were evicted; vLLM's sliding-window prefix caching)."""
        # missing[i]: blocks among the first i that are not indexed
        missing = list(accumulate((self.pool.lookup(key) is None for key in keys), initial=0))
        for n in range(len(keys), 0, -1):
            gap = self._window_gap(n * self.block_size)
            seen = [(0, n)] if not gap else [(0, gap.start), (gap.stop, n)]
            if all(missing[end] == missing[start] for start, end in seen):
                return n
        return 0

    def _window_gap(self, position: int) -> range:
        """The blocks wholly between the sinks and the window of the token at `position`:
        no token from there on sees them (none without a window)."""
        if self.window is None:
            return range(0)
        return _blocks_between(position, self.window, self.sinks, self.block_size)

    def fork(self, seq: int) -> int:
        parent = self._seqs[self._known(seq)]
        child = super().add_sequence()
        for block in parent.blocks:
            if block != GIVEN_BACK:
                self.pool.share(block)
        self._seqs[child] = _Sequence(list(parent.blocks), list(parent.tokens), list(parent.hashes))
        self._lengths[child] = self._lengths[seq]
        return child

    def truncate(self, seq: int, length: int) -> None:
        self._check_truncate(seq, length)
        state = self._seqs[seq]
        if self.window is not None:
            bs, first = self.block_size, max(0, length - self.window + 1)
            needed = range(first // bs, -(-length // bs))
            lost = [i * bs for i in needed if state.blocks[i] == GIVEN_BACK]
            if lost:
                raise ValueError(
                    f"cannot truncate sequence {seq} to length={length}: its next token would "
                    f"see tokens from {first} on (window={self.window}), but the block of "
                    f"tokens {lost[0]}..{lost[0] + bs - 1} was given back when the window "
                    "passed it"
                )
        self._end_step_if_involves(seq)
        keep = -(-length // self.block_size)
        for block in reversed(state.blocks[keep:]):  # tail first: it is evicted first
            if block != GIVEN_BACK:
                self.pool.release(block)
        del state.blocks[keep:]
        del state.tokens[length:]
        del state.hashes[len(state.tokens) // self.block_size :]
        self._lengths[seq] = length

    def free(self, seq: int) -> None:
        self._known(seq)
        self._end_step_if_involves(seq)
        for block in reversed(self._seqs.pop(seq).blocks):
            if block != GIVEN_BACK:
                self.pool.release(block)
        del self._lengths[seq]

    # -- a step ---------------------------------------------------------------------------
    def prepare(self, seq_ids, n_new: int, token_ids: Tensor | None = None) -> PagedStep:
        """Reserve blocks for `n_new` tokens of each sequence; see `KVCache.prepare`.

        `token_ids` (`(batch, n_new)` tensor or nested lists; a row may be None) lets the
        blocks these tokens fill be indexed for prefix caching.
        """
        seq_ids = self._check_step(seq_ids, n_new)
        rows = _token_rows(token_ids, len(seq_ids), n_new)
        passed = self._passed_by_windows(seq_ids)  # given back once the step fits
        releases = Counter(self._seqs[seq].blocks[i] for seq, ids in passed.items() for i in ids)
        grow, copy = self._plan(seq_ids, n_new, releases)
        freed = sum(count == self.pool.ref_counts[block] for block, count in releases.items())
        needed, available = sum(grow) + sum(copy), self.pool.num_available + freed
        if needed > available:
            whole = f" (the whole pool has {self.num_blocks})" if needed > self.num_blocks else ""
            raise CacheFull(
                f"this step needs {needed} blocks ({sum(grow)} new, {sum(copy)} copy-on-write)"
                f"{whole} but {available} are free",
                needed=needed,
                available=available,
            )
        # From here on nothing can fail: the whole batch fits.
        bs, start = self.block_size, [self._lengths[s] for s in seq_ids]
        self._pending, self._layers_written = [], set()
        for seq, indices in passed.items():  # the newest first: it is evicted first
            blocks = self._seqs[seq].blocks
            for i in indices:
                self.pool.release(blocks[i])
                blocks[i] = GIVEN_BACK
        for seq, begin, n_grow, cow, row in zip(seq_ids, start, grow, copy, rows, strict=True):
            state = self._seqs[seq]
            if begin % bs:  # writing into the last, partly filled block
                last = state.blocks[-1]
                if cow:  # shared: give this writer its own copy, the other holders keep theirs
                    state.blocks[-1] = self._copy_block(last)
                    self.pool.release(last)
                else:  # ours alone: its indexed contents are about to change
                    self.pool.unregister(last)
            state.blocks.extend(self.pool.allocate() for _ in range(n_grow))
            if row is not None and len(state.tokens) == begin:
                state.tokens.extend(row)
                self._hash_full_blocks(state)
            self._lengths[seq] = begin + n_new
        self.step = self._make_step(seq_ids, start, n_new)
        return self.step

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        step = self._write(layer, k, v)
        views = []
        for pool in (self.k_pool[layer], self.v_pool[layer]):
            gathered = pool[step.block_table].flatten(1, 2)  # (batch, blocks * bs, heads, d)
            views.append(gathered[:, : step.kv_len].transpose(1, 2))
        return views[0], views[1]

    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, pattern: Mask | None, backend="auto"
    ) -> Tensor:
        """At decode (one new token per sequence, no pattern or a sliding window with or
        without sinks, `auto`), attention reads the pool in place through the block tables
        (`paged_decode`: the C++ kernel on CPU, Triton on CUDA; a window's tokens only)
        instead of gathering every cached byte into views first. A windowed layer's step
        of several tokens per sequence at one position (a prefill chunk) gathers only the
        blocks its window and sinks see (`_window_span`)."""
        narrowed, seen = self._seen_by(pattern)
        step = self.step
        plain = narrowed is None or seen is not None
        fits = isinstance(step, PagedStep) and step.n_new == 1 and plain
        kernel = choose_paged_backend(q, self.k_pool, self.v_pool) if fits else "torch"
        if backend != "auto" or kernel == "torch" or q.shape[2] != 1:
            span = self._window_span(seen) if seen is not None else None
            if span is None:
                return super().attend(layer, q, k, v, pattern, backend)  # layer_mask narrows it
            self._write(layer, k, v)
            blocks, n_keys, q_offset = span
            k_all, v_all = (
                pool[layer][step.block_table[:, blocks]].flatten(1, 2)[:, :n_keys].transpose(1, 2)
                for pool in (self.k_pool, self.v_pool)
            )
            return attention(q, k_all, v_all, narrowed, backend=backend, q_offset=q_offset)
        self._write(layer, k, v)
        lengths = step.start + 1
        window, sinks = seen or (None, 0)
        out = paged_decode(
            q[:, :, 0],
            self.k_pool[layer],
            self.v_pool[layer],
            step.block_table,
            lengths,
            backend=kernel,
            window=window,
            sinks=sinks,
            check=False,  # the tables are valid by construction
        )
        return out.unsqueeze(2)

    def _window_span(self, seen: tuple[int, int]) -> tuple[Tensor, int, int] | None:
        """For a step whose sequences all start at one position (a prefill chunk; or a
        decode step the paged kernel does not take: another backend asked for, or none
        built) and whose layers see a window `seen` = (window, sinks) that has passed
        whole blocks: the table columns of the blocks its queries see (the sinks' and the
        window's), how many keys they hold, and the query offset that keeps the window's
        distances over them (the blocks between left out); worked out once per step and
        window. A long prefill's chunks then gather about `window + n_new` tokens, not the
        whole history. None otherwise (the whole table is gathered)."""
        step = self.step
        if self._spans[0] is not step:
            self._spans = (step, {})
        spans = self._spans[1]
        if seen not in spans:
            spans[seen] = None
            start, bs = step.common_start, self.block_size
            if isinstance(step, PagedStep) and start is not None:
                gap = _blocks_between(start, *seen, bs)
                if gap:
                    n_blocks = step.block_table.shape[1]
                    columns = [*range(gap.start), *range(gap.stop, n_blocks)]
                    skipped = len(gap) * bs
                    blocks = torch.tensor(columns, device=step.block_table.device)
                    spans[seen] = (blocks, step.kv_len - skipped, start - skipped)
        return spans[seen]

    def layer_mask(self, layer: int, pattern: Mask | None = None) -> Mask | None:
        """The step's mask for `layer`'s `pattern`, narrowed to this cache's window (if it
        has one): the views `update` returns hold junk where blocks were given back."""
        return super().layer_mask(layer, self._seen_by(pattern)[0])

    def decode_storage(self) -> KVStorage | None:
        """The pools as they are, read through the step's block tables, at a decode step;
        with a window, only the window's and the sinks' keys are there to read."""
        step = self.step
        if not isinstance(step, PagedStep) or step.n_new != 1:
            return None
        return KVStorage(
            self.k_pool, self.v_pool, step.block_table, step.start, self.window, self.sinks
        )

    def stored_every_layer(self) -> None:
        self._stored(range(self.n_layers))

    def _stored(self, layers) -> None:
        """`layers` hold this step's K/V; once all do, its full blocks join the prefix index."""
        self._layers_written.update(layers)
        if len(self._layers_written) == self.n_layers:
            for block, key in self._pending:
                self.pool.register(block, key)
            self._pending = []

    def _write(self, layer: int, k: Tensor, v: Tensor) -> PagedStep:
        """Check and store this step's K/V for `layer` in its slots of the pool."""
        step = self._check_update(layer, k, v, self.n_layers)
        if not isinstance(step, PagedStep):
            raise RuntimeError("update() needs a step from this cache's prepare()")
        for name, t, dim in (("k", k, self.head_dim), ("v", v, self.v_head_dim)):
            if t.shape[1] != self.kv_heads or t.shape[3] != dim:
                raise ValueError(
                    f"{name} must have kv_heads={self.kv_heads} and head_dim={dim}, "
                    f"got {tuple(t.shape)}"
                )
        for pool, new in ((self.k_pool[layer], k), (self.v_pool[layer], v)):
            # Advanced indices (batch, n_new) on (block, offset): target (batch, n_new, heads, d).
            pool[step.slot_blocks, step.slot_offsets] = new.transpose(1, 2).to(pool.dtype)
        self._stored((layer,))
        return step

    # -- helpers --------------------------------------------------------------------------
    def _seen_by(self, pattern: Mask | None) -> tuple[Mask | None, tuple[int, int] | None]:
        """What a layer of `pattern` sees here: its mask, narrowed to this cache's window
        where it would reach further back (the window applies to every layer, as a ring
        buffer's does), and that mask's (window, sinks) where it is one (None otherwise)."""
        seen = window_and_sinks(pattern)
        if self.window is None:
            return pattern, seen
        if pattern is None:
            return self._window_mask(), (self.window, self.sinks)
        if window_within(seen, self.window, self.sinks):
            return pattern, seen
        return pattern & self._window_mask(), None

    def _window_mask(self) -> Mask:
        return window_and_sinks_mask(self.window, self.sinks)

    def _passed_by_windows(self, seq_ids) -> dict[int, list[int]]:
        """Per sequence, the blocks it still holds that lie wholly between its sinks and the
        window of its next token, newest first: no step from now on can see them."""
        passed = {}
        if self.window is not None:
            for seq in seq_ids:
                blocks, indices = self._seqs[seq].blocks, []
                for i in reversed(self._window_gap(self._lengths[seq])):
                    if blocks[i] == GIVEN_BACK:
                        break  # and every one before it, on an earlier step
                    indices.append(i)
                passed[seq] = indices
        return passed

    def _plan(
        self, seq_ids: tuple[int, ...], n_new: int, releases: Counter
    ) -> tuple[list[int], list[int]]:
        """Per sequence: blocks to allocate, and 1 where its last block needs copy-on-write.

        Two sequences of one batch may share a last block: the first writer copies it, after
        which the second holds it alone. Counting that way keeps the check exact at the limit.
        `releases`: references the step gives back first (a window passed them), which may
        leave a fork's last block to it alone.
        """
        bs, refs = self.block_size, {}
        grow, copy = [], []
        for seq in seq_ids:
            begin, blocks = self._lengths[seq], self._seqs[seq].blocks
            grow.append(-(-(begin + n_new) // bs) - len(blocks))
            cow = 0
            if begin % bs:
                last = blocks[-1]
                refs[last] = refs.get(last, self.pool.ref_counts[last] - releases[last])
                cow = int(refs[last] > 1)
                refs[last] -= cow
            copy.append(cow)
        return grow, copy

    def _copy_block(self, block: int) -> int:
        new = self.pool.allocate()
        self.k_pool[:, new] = self.k_pool[:, block]
        self.v_pool[:, new] = self.v_pool[:, block]
        return new

    def _hash_full_blocks(self, state: _Sequence) -> None:
        """Chain-hash the newly completed blocks of known tokens; index them after the step."""
        bs = self.block_size
        for i in range(len(state.hashes), len(state.tokens) // bs):
            key = chain_hash(state.hashes[-1] if i else b"", state.tokens[i * bs : (i + 1) * bs])
            state.hashes.append(key)
            self._pending.append((state.blocks[i], key))

    def _make_step(self, seq_ids: tuple[int, ...], start: list[int], n_new: int) -> PagedStep:
        device, bs = self.k_pool.device, self.block_size
        kv_len = max(start) + n_new
        n_blocks = -(-kv_len // bs)
        table = torch.zeros(len(seq_ids), n_blocks, dtype=torch.long)
        for b, seq in enumerate(seq_ids):
            blocks = self._seqs[seq].blocks
            # array.array packs Python ints ~4x faster than torch.tensor (a 32k-token
            # sequence's 2048 blocks of 16: ~25 us instead of ~80); read as it is, once
            if blocks:  # (frombuffer refuses an empty buffer)
                table[b, : len(blocks)] = torch.frombuffer(array("q", blocks), dtype=torch.long)
        table.clamp_(min=0)  # given back: a gather reads block 0, masked out (as padding)
        start_t = torch.tensor(start, dtype=torch.long)
        positions = start_t.unsqueeze(1) + torch.arange(n_new)  # (batch, n_new)
        slot_blocks = table.gather(1, positions // bs)
        table, start_t = table.to(device), start_t.to(device)
        return PagedStep(
            seq_ids,
            start_t,
            n_new,
            kv_len,
            causal_step_mask(start_t, n_new, kv_len),
            block_table=table,
            slot_blocks=slot_blocks.to(device),
            slot_offsets=(positions % bs).to(device),
        )

    def _end_step_if_involves(self, seq: int) -> None:
        # The step's block indices for `seq` may now point at released blocks: forbid updates.
        if self.step is not None and seq in self.step.seq_ids:
            self.step, self._pending = None, []


def _blocks_between(position: int, window: int, sinks: int, block_size: int) -> range:
    """The blocks wholly between the first `sinks` tokens and the `window` of the token at
    `position`: that token, and every one after it, sees none of their keys."""
    return range(-(-sinks // block_size), (position - window + 1) // block_size)


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _token_row(row: object, name: str, length: int | None = None) -> list[int]:
    """One sequence's token ids as a list of ints (from a 1-D integer tensor or a list)."""
    if isinstance(row, Tensor):
        if row.dim() != 1 or not _is_integer(row.dtype):
            raise ValueError(f"{name} must be a 1-D integer tensor, got {row.dim()}-D {row.dtype}")
        row = row.tolist()
    if not isinstance(row, (list, tuple)) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in row
    ):
        raise ValueError(f"{name} must be a list of integer token ids, got {row!r:.80}")
    if length is not None and len(row) != length:
        raise ValueError(f"{name} must hold n_new={length} token ids, got {len(row)}")
    return list(row)


def _token_rows(token_ids: object, batch: int, n_new: int) -> list[list[int] | None]:
    """`prepare`'s token_ids as one row per sequence (None: not given for that sequence)."""
    if token_ids is None:
        return [None] * batch
    if isinstance(token_ids, Tensor):
        if not _is_integer(token_ids.dtype):
            raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        if tuple(token_ids.shape) != (batch, n_new):
            raise ValueError(
                f"token_ids must be (batch={batch}, n_new={n_new}), got {tuple(token_ids.shape)}"
            )
        return token_ids.tolist()
    if not isinstance(token_ids, (list, tuple)) or len(token_ids) != batch:
        raise ValueError(
            f"token_ids must hold one row per sequence ({batch}), got {token_ids!r:.80}"
        )
    return [
        None if row is None else _token_row(row, f"token_ids[{b}]", n_new)
        for b, row in enumerate(token_ids)
    ]
