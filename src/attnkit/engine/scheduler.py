"""Continuous batching over a paged KV cache (Orca / vLLM style, small enough to read).

Requests join and leave between steps. Each step first admits waiting requests (FIFO) and
prefills them, reusing any block-aligned prefix the cache already holds, then decodes one
token for every running request in a single batched forward. When the cache runs out of
blocks, the newest running request is preempted: its blocks are freed and it waits to be
recomputed from its prompt plus what it has generated, so greedy outputs never change.
A request that could not fit even in an empty cache finishes with an error.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attnkit._checks import check_positive_int
from attnkit.cache.base import CacheFull
from attnkit.engine.sampling import SamplingParams, next_tokens


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


class Scheduler:
    """Run many requests through one model and one PagedCache, batching their decode steps."""

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
            except CacheFull:
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
            request = self.waiting[0]
            context = request.prompt_ids + request.token_ids  # recompute after preemption
            seq = self.cache.add_sequence(token_ids=context)
            reused = self.cache.length(seq)
            try:
                logits = None
                for start in range(reused, len(context), self.prefill_chunk):
                    chunk = context[start : start + self.prefill_chunk]
                    logits = self._forward([request], [chunk], seq_ids=[seq], last_only=True)
            except CacheFull as full:
                self.cache.free(seq)
                if not self.running:  # even an otherwise empty cache cannot hold it
                    self.waiting.popleft()
                    request.finish_reason, request.error = "error", f"request does not fit: {full}"
                    continue
                return  # wait for running requests to finish and free their blocks
            self.waiting.popleft()
            request._seq, request.reused_tokens = seq, request.reused_tokens + reused
            self.running.append(request)
            self._choose_next(request, logits[0, -1])

    def _forward(self, requests, token_rows, seq_ids=None, last_only=False):
        ids = torch.tensor(token_rows, device=self._device)
        seq_ids = seq_ids if seq_ids is not None else [r._seq for r in requests]
        return self.model(ids, cache=self.cache, seq_ids=seq_ids, last_only=last_only)

    def _choose_next(self, request: Request, logits_row) -> None:
        """Sample the next token, or finish the request (stop token / length)."""
        if len(request.token_ids) >= request.max_new_tokens:
            return self._finish(request, "length")
        token = int(next_tokens(logits_row.unsqueeze(0), request.sampling, request._generator))
        if token in request.stop_token_ids:
            return self._finish(request, "stop_token")
        request._next = token
        return None

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason, request._next = reason, None
        self.cache.free(request._seq)
        self.running.remove(request)

    def _preempt(self, request: Request) -> None:
        self.cache.free(request._seq)
        self.running.remove(request)
        request._seq, request._next = None, None
        request.preemptions += 1
        self.waiting.appendleft(request)
