"""Continuous batching: every request's greedy output equals its output alone, under
preemption, prefix sharing, chunked prefill and batching; a request too large errors."""

from __future__ import annotations

import pytest
import torch
from test_generate import DigitTokenizer, tiny_model

from attnkit.cache.paged import PagedCache
from attnkit.engine import generate
from attnkit.engine.scheduler import Scheduler


def paged_for(model, num_blocks: int, block_size: int = 4) -> PagedCache:
    c = model.config
    return PagedCache(
        c.num_hidden_layers,
        c.num_key_value_heads,
        c.head_dim,
        num_blocks=num_blocks,
        block_size=block_size,
        dtype=torch.float64,
        seed=0,
    )


def alone(model, prompt, n):
    return generate(model, DigitTokenizer(), prompt, n, stop_token_ids=())[0].token_ids


def workload(seed: int, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randint(1, 27, (9,), generator=gen).tolist()  # a common system prompt
    out = []
    for i in range(n):
        own = torch.randint(1, 27, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen)
        prompt = (shared if i % 2 == 0 else []) + own.tolist()
        out.append((prompt, int(torch.randint(1, 15, (1,), generator=gen))))
    return out


@pytest.mark.parametrize(
    ("num_blocks", "max_batch", "chunk"),
    [(200, 32, 512), (24, 32, 3), (40, 4, 5)],
    ids=["roomy", "tight-preempting", "small-batch"],
)
def test_every_request_equals_its_output_alone(num_blocks, max_batch, chunk):
    model = tiny_model(12)
    requests = workload(num_blocks)
    scheduler = Scheduler(
        model, paged_for(model, num_blocks), max_batch=max_batch, prefill_chunk=chunk
    )
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.finish_reason == "length"
        assert request.token_ids == alone(model, prompt, n)
    if num_blocks == 24:
        assert sum(r.preemptions for r in handles) > 0  # the pool really was too small
    assert sum(r.reused_tokens for r in handles) > 0  # the shared prompt prefix was reused
    assert scheduler.cache.num_free_blocks == num_blocks  # every block came back


def test_requests_interleave_rather_than_run_one_after_another():
    model = tiny_model(13)
    scheduler = Scheduler(model, paged_for(model, 100))
    for prompt, n in workload(1, 6):
        scheduler.add(prompt, n)
    scheduler.run()
    longest = max(r.max_new_tokens for r in scheduler.requests)
    assert scheduler.steps <= longest + 1  # batched: steps ~ the longest answer, not the sum


def test_a_request_larger_than_the_whole_cache_finishes_with_an_error():
    model = tiny_model(14)
    scheduler = Scheduler(model, paged_for(model, num_blocks=4, block_size=4))  # 16 tokens
    small = scheduler.add([1, 2, 3], 4)
    huge = scheduler.add(list(range(1, 27)), 4)
    scheduler.run()
    assert huge.finish_reason == "error" and "does not fit" in huge.error
    assert small.finish_reason == "length" and small.token_ids == alone(model, [1, 2, 3], 4)


def test_stop_tokens_finish_a_request_early():
    model = tiny_model(15)
    prompt = [4, 5, 6]
    free = alone(model, prompt, 10)
    scheduler = Scheduler(model, paged_for(model, 50))
    request = scheduler.add(prompt, 10, stop_token_ids=[free[2]])
    scheduler.run()
    assert request.token_ids == free[: free.index(free[2])]
    assert request.finish_reason == "stop_token"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch": 0}, "max_batch must be an integer >= 1"),
        ({"prefill_chunk": 0}, "prefill_chunk must be an integer >= 1"),
    ],
)
def test_bad_scheduler_arguments(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        Scheduler(model, paged_for(model, 10), **kwargs)


def test_bad_request_arguments():
    model = tiny_model()
    scheduler = Scheduler(model, paged_for(model, 10))
    with pytest.raises(ValueError, match="prompt_ids must hold at least one token"):
        scheduler.add([], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        scheduler.add([1], 0)
