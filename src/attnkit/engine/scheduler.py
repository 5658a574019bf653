"""Continuous batching over a KV cache (Orca / vLLM style, small enough to read).

Requests join and leave between steps. Each step first admits waiting requests (FIFO) and
prefills them, reusing any block-aligned prefix a paged cache already holds (prompts that
fit one prefill chunk go together, in right-padded batches of similar length), then decodes
one token for every running request in a single batched forward. When the cache runs out
of blocks, the newest running request is preempted: its blocks are freed and it waits to be
recomputed from its prompt plus what it has generated, so greedy outputs never change; a
cache out of sequence slots makes waiting requests wait. A request that could not fit even
in an empty cache finishes with an error, as does one that grows past the whole cache while
running alone, or past a cache's length limit per sequence (`max_len`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheFull
from attnkit.engine.sampling import SamplingParams, next_tokens

# Padding allowed in a batched prefill, as a share of its real tokens.
PREFILL_PADDING = 0.25


@dataclass
class Request:
    """One generation request and its progress."""

    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop_token" or "error"
    error: str | None = None
    preemptions: int = 0
    reused_tokens: int = 0  # prompt tokens served from the prefix cache, summed over admissions
    _seq: int | None = None
    _next: int | None = None  # sampled, not yet fed to the model
    _generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context(self) -> list[int]:
        """What a prefill feeds: the prompt plus what was generated (recomputed after a
        preemption)."""
        return self.prompt_ids + self.token_ids


class Scheduler:
    """Run many requests through one model and one cache, batching their decode steps.

    Any cache the model takes serves: a `PagedCache` (`model.new_paged_cache`) shares
    prompt prefixes and holds each request's tokens only; a cache of per-sequence slots
    (`model.new_cache(0, max_seqs=..)`: contiguous K/V, MLA latents, ring buffers, linear
    attention's state) takes as many requests at once as it has free slots, the rest wait.
    """

    def __init__(self, model, cache, *, max_batch: int = 32, prefill_chunk: int = 512) -> None:
        check_positive_int("max_batch", max_batch)
        check_positive_int("prefill_chunk", prefill_chunk)
        self.model, self.cache = model, cache
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: list[Request] = []
        self.steps = 0
        self._device = next(model.parameters()).device

    def add(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> Request:
        """Queue a request; it joins the batch at the next step with room for it."""
        if not prompt_ids:
            raise ValueError("prompt_ids must hold at least one token")
        check_positive_int("max_new_tokens", max_new_tokens)
        sampling = sampling or SamplingParams()
        request = Request(
            len(self.requests),
            [int(t) for t in prompt_ids],
            max_new_tokens,
            sampling,
            frozenset(stop_token_ids),
        )
        if sampling.seed is not None:
            request._generator = torch.Generator().manual_seed(sampling.seed)
        self.requests.append(request)
        self.waiting.append(request)
        return request

    def run(self) -> list[Request]:
        """Step until every request has finished; returns them in the order they were added."""
        while self.waiting or self.running:
            self.step()
        return self.requests

    @torch.no_grad()
    def step(self) -> None:
        """Admit and prefill what fits, then decode one token for every running request."""
        self.steps += 1
        self._admit()
        decoding = [r for r in self.running if r._next is not None]
        while decoding:
            try:
                logits = self._forward(decoding, [[r._next] for r in decoding])
                break
            except CacheFull as full:
                at_limit = self._at_their_limit(decoding, full)
                if at_limit:  # freeing other requests' room would not help them
                    for request in at_limit:
                        self._outgrown(request, full)
                elif len(self.running) == 1:  # alone in the cache and still out of room:
                    self._outgrown(self.running[0], full)  # it can never grow here
                else:
                    self._preempt(self.running[-1])  # the newest request gives its blocks back
                decoding = [r for r in self.running if r._next is not None]
        else:
            return
        for request, row in zip(decoding, logits[:, -1], strict=True):
            request.token_ids.append(request._next)
            self._choose_next(request, row)

    # -- internals ------------------------------------------------------------------------
    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            group = self._short_prompts()
            if len(group) > 1 and self._prefill_together(group):
                continue
            request = self.waiting[0]
            try:
                seq, reused, logits = self._prefill_alone(request)
            except CacheFull as full:
                if self.running and not full.per_sequence:
                    return  # wait for running requests to finish and give their room back
                self._refuse(request, full)  # even an otherwise empty cache cannot hold it
                continue
            self.waiting.popleft()
            request._seq, request.reused_tokens = seq, request.reused_tokens + reused
            self.running.append(request)
            self._choose_next(request, logits[0, -1])

    def _prefill_alone(self, request: Request) -> tuple[int, int, Tensor]:
        """Add `request`'s sequence and prefill its context in chunks: its sequence id, the
        tokens reused from the cache, the last logits. On `CacheFull` (no sequence slot, no
        block, past `max_len`) the cache is left as it was."""
        context = request.context
        seq = self.cache.add_sequence(token_ids=context)
        reused = self.cache.length(seq)
        try:
            logits = None
            for start in range(reused, len(context), self.prefill_chunk):
                chunk = context[start : start + self.prefill_chunk]
                logits = self._forward([request], [chunk], seq_ids=[seq], last_only=True)
        except CacheFull:
            self.cache.free(seq)
            raise
        return seq, reused, logits

    def _short_prompts(self) -> list[Request]:
        """The waiting requests at the head of the queue that may join the running batch
        and whose whole context fits one prefill chunk (and one cache step: the padding is
        taken back from the last step)."""
        if not getattr(self.cache, "undoes_last_step", False):  # padding could not be cut off
            return []
        block = getattr(self.cache, "block_size", None)  # paged: prompts may share blocks
        widest = min(self.prefill_chunk, self.cache.max_step_tokens or self.prefill_chunk)
        group, first_blocks = [], set()
        for request in self.waiting:
            context = request.context
            if len(self.running) + len(group) == self.max_batch or len(context) > widest:
                break
            # a prompt that starts like one in the group waits for its blocks to be indexed
            first = tuple(context[:block]) if block is not None and len(context) > block else None
            if first in first_blocks:
                break
            if first is not None:
                first_blocks.add(first)
            group.append(request)
        return group

    def _prefill_together(self, group: list[Request]) -> bool:
        """Prefill `group` (the head of the queue) in batched forwards of right-padded rows
        of similar length, then admit them (as many as the cache has sequence slots for);
        False, with the cache as it was, when fewer than two fit or the cache cannot hold
        the padded rows (the one-at-a-time path then waits or errors); True too where a
        request of the group can never fit (past a limit per sequence) and was ended.
        Needs a cache whose `truncate` takes back the padding (`undoes_last_step`); a paged
        one (or a `LayeredCache` of pools of one block size) is checked for blocks up front
        (`block_size`, `num_free_blocks`).

        One forward of many short prompts runs its matmuls at a far better rate than one per
        prompt (20-200 tokens each). Causal attention keeps the padding after a row's last
        token out of its logits; the padded slots are truncated away afterwards.
        """
        seqs, rows = [], []
        for request in group:
            context = request.context
            try:
                seq = self.cache.add_sequence(token_ids=context)
            except CacheFull:  # no sequence slot left: the rest of the group waits
                break
            seqs.append(seq)
            rows.append(context[self.cache.length(seq) :])
        group = group[: len(seqs)]
        batches = _similar_lengths(rows, self.prefill_chunk)
        logits: list[Tensor | None] = [None] * len(group)
        try:
            if len(group) < 2:
                raise CacheFull("fewer than two sequence slots are free", needed=2)
            if getattr(self.cache, "block_size", None) is not None:  # checked up front: no
                needed = self._blocks_for_padded(seqs, rows, batches)  # forward thrown away
                if needed > (free := self.cache.num_free_blocks):
                    raise CacheFull("the padded rows do not fit", needed=needed, available=free)
            for batch in batches:
                width = max(len(rows[i]) for i in batch)
                padded = [rows[i] + [rows[i][-1]] * (width - len(rows[i])) for i in batch]
                ids = torch.tensor(padded, device=self._device)
                last = torch.tensor([len(rows[i]) - 1 for i in batch], device=self._device)
                out = self.model(
                    ids, cache=self.cache, seq_ids=[seqs[i] for i in batch], logits_at=last
                )
                for i, row in zip(batch, out[:, 0], strict=True):
                    self.cache.truncate(seqs[i], self.cache.length(seqs[i]) - width + len(rows[i]))
                    logits[i] = row
        except BaseException as error:  # nothing admitted: give every block back
            for seq in seqs:
                self.cache.free(seq)
            if isinstance(error, CacheFull):
                return self._refuse_too_long(group, error)
            raise
        for request, seq, row, new in zip(group, seqs, logits, rows, strict=True):
            self.waiting.popleft()
            request._seq = seq
            request.reused_tokens += self.cache.length(seq) - len(new)
            self.running.append(request)
            self._choose_next(request, row)
        return True

    def _blocks_for_padded(self, seqs, rows, batches) -> int:
        """Blocks the padded rows take beyond what their sequences hold (prefixes reused
        from the cache are whole blocks: no copy-on-write)."""
        bs, needed = self.cache.block_size, 0
        for batch in batches:
            width = max(len(rows[i]) for i in batch)
            for i in batch:
                length = self.cache.length(seqs[i])  # in ceil(length / bs) blocks
                needed += -(-(length + width) // bs) - -(-length // bs)
        return needed

    def _forward(self, requests, token_rows, seq_ids=None, last_only=False):
        ids = torch.tensor(token_rows, device=self._device)
        seq_ids = seq_ids if seq_ids is not None else [r._seq for r in requests]
        return self.model(ids, cache=self.cache, seq_ids=seq_ids, last_only=last_only)

    def _choose_next(self, request: Request, logits_row) -> None:
        """Sample the next token: it finishes the request (a stop token; the last token
        wanted, kept without a forward of its own) or is fed at the next step."""
        token = int(next_tokens(logits_row.unsqueeze(0), request.sampling, request._generator))
        if token in request.stop_token_ids:
            return self._finish(request, "stop_token")
        if len(request.token_ids) + 1 >= request.max_new_tokens:
            request.token_ids.append(token)
            return self._finish(request, "length")
        request._next = token
        return None

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason, request._next = reason, None
        self.cache.free(request._seq)
        self.running.remove(request)

    def _at_their_limit(self, decoding: list[Request], full: CacheFull) -> list[Request]:
        """The requests a step could not grow because each reached the cache's limit per
        sequence (`max_len`); none where the limit is shared (blocks, slots)."""
        if not full.per_sequence:
            return []
        return [r for r in decoding if self.cache.length(r._seq) + 1 > full.available]

    def _refuse_too_long(self, group: list[Request], full: CacheFull) -> bool:
        """After a batched prefill of `group` failed on `full`: end the requests whose
        context is past a limit per sequence (no wait gives them room), so that the others
        go on together; whether there were any."""
        if not full.per_sequence:
            return False
        too_long = [r for r in group if len(r.context) > full.available]
        for request in too_long:
            self._refuse(request, full)
        return bool(too_long)

    def _refuse(self, request: Request, full: CacheFull) -> None:
        """End waiting `request` with an error: the cache can never hold it."""
        self.waiting.remove(request)
        request.finish_reason, request.error = "error", f"request does not fit: {full}"

    def _outgrown(self, request: Request, full: CacheFull) -> None:
        """`request` needs more room than the whole cache has (or than it gives one
        sequence): it ends with an error, keeping what it generated, the token it sampled
        last included (preempted and recomputed, it would fail again, forever)."""
        request.token_ids.append(request._next)  # sampled from a whole context: it stands
        self._finish(request, "error")
        where = "its cache's room for one sequence" if full.per_sequence else "the whole cache"
        request.error = f"request outgrew {where} after {len(request.token_ids)} new tokens: {full}"

    def _preempt(self, request: Request) -> None:
        self.cache.free(request._seq)
        self.running.remove(request)
        request._seq, request._next = None, None
        request.preemptions += 1
        self.waiting.appendleft(request)


def _similar_lengths(rows: list[list[int]], budget: int) -> list[list[int]]:
    """Indices of `rows` in batches of similar length (shortest first): a batch grows while
    its padded size stays within `budget` tokens and its padding within `PREFILL_PADDING`
    of its real tokens; every batch holds at least one row."""
    batches: list[list[int]] = []
    real = 0
    for i in sorted(range(len(rows)), key=lambda i: len(rows[i])):
        n = len(rows[i])  # the longest so far: the batch's width if it joins
        batch = batches[-1] if batches else []
        padded = n * (len(batch) + 1)
        if batch and padded <= budget and padded <= (1 + PREFILL_PADDING) * (real + n):
            batch.append(i)
            real += n
        else:
            batches.append([i])
            real = n
    return batches
