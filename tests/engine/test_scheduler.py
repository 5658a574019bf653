"""Continuous batching: every request's greedy output equals its output alone, under
preemption, prefix sharing, chunked and batched prefill and batching; a request too large
errors."""

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


@pytest.mark.parametrize(
    ("num_blocks", "windowed"),
    [(200, False), (24, False), (10, False), (10, True)],
    ids=["roomy", "tight-preempting", "tighter-preempting", "tighter-giving-blocks-back"],
)
def test_a_sliding_window_model_serves_each_request_as_alone(num_blocks, windowed):
    """A PagedCache without a window keeps every token, and a windowed model's layers see
    only their window of it (decode reads just the window); `new_paged_cache` gives the
    cache the model's window, and it gives back the blocks behind each request's window, so
    8 requests of up to 28 tokens fit 10 blocks of 4 without preemption. Outputs equal
    `generate`'s through its ring buffer. Prompts and answers run past the window of 5;
    prefill chunks of 3 cross it."""
    model = tiny_model(13, sliding_window=5)
    requests = workload(num_blocks + 1)
    cache = model.new_paged_cache(num_blocks, block_size=4, seed=0)
    assert cache.window == 5 and cache.k_pool.dtype == torch.float64
    if not windowed:
        cache = paged_for(model, num_blocks)
    scheduler = Scheduler(model, cache, max_batch=8, prefill_chunk=3)
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.token_ids == alone(model, prompt, n)
    assert max(len(p) + n for p, n in requests) > 2 * 5
    preempted = sum(r.preemptions for r in handles) > 0
    assert preempted == (num_blocks < 200 and not windowed)
    assert scheduler.cache.num_free_blocks == num_blocks


@pytest.mark.parametrize("num_blocks", [60, 12], ids=["roomy", "tight-preempting"])
def test_a_model_mixing_windowed_and_global_layers_serves_each_request_as_alone(num_blocks):
    """`new_paged_cache` gives such a model a LayeredCache of two pools: the windowed
    layer's gives back blocks behind its window, the global layer's keeps every token (and
    is the one that runs out). Prompts shared in part reuse a prefix both pools hold."""
    model = tiny_model(19, sliding_window=5, layer_types=("sliding_attention", "full_attention"))
    cache = model.new_paged_cache(num_blocks, block_size=4, seed=0)
    assert sorted(c.window or 0 for c in cache.caches) == [0, 5]
    requests = workload(num_blocks + 2)
    scheduler = Scheduler(model, cache, max_batch=8, prefill_chunk=3)
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.finish_reason == "length"
        assert request.token_ids == alone(model, prompt, n)
    assert (num_blocks == 12) == (sum(r.preemptions for r in handles) > 0)
    assert sum(r.reused_tokens for r in handles) > 0
    assert [c.num_free_blocks for c in cache.caches] == [num_blocks] * 2


def test_requests_interleave_rather_than_run_one_after_another():
    model = tiny_model(13)
    scheduler = Scheduler(model, paged_for(model, 100))
    for prompt, n in workload(1, 6):
        scheduler.add(prompt, n)
    scheduler.run()
    longest = max(r.max_new_tokens for r in scheduler.requests)
    assert scheduler.steps <= longest + 1  # batched: steps ~ the longest answer, not the sum


def record_forwards(model) -> list[tuple[int, int]]:
    """(batch, seq) of every forward of `model` that returned."""
    shapes = []
    model.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape)))
    return shapes


def test_short_prompts_prefill_together_as_right_padded_rows():
    model = tiny_model(16)
    gen = torch.Generator().manual_seed(16)
    lengths = [7, 8, 9, 8, 2, 3, 3, 16]  # similar lengths batch; 2 and 16 go apart
    requests = [(torch.randint(1, 27, (n,), generator=gen).tolist(), 5) for n in lengths]
    scheduler = Scheduler(model, paged_for(model, 100))
    shapes = record_forwards(model)
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    prefills = [shape for shape in shapes if shape[1] > 1]
    assert sum(b for b, _ in prefills) == len(requests)  # each prompt prefilled once
    assert (4, 9) in prefills and (3, 3) in prefills  # rows 7-9 and 2-3 long, padded
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.token_ids == alone(model, prompt, n)
    assert scheduler.cache.num_free_blocks == 100  # the padded slots came back too


@pytest.mark.parametrize("num_blocks", [100, 9], ids=["roomy", "tight"])
def test_a_mixed_model_prefills_short_prompts_together_in_both_pools(num_blocks):
    """A LayeredCache of pools of one block size batches short prompts as one pool does
    (the padded rows fit the fuller pool, or the prompts go one at a time); past the
    window of 5 the windowed pool gives back blocks, and the padding still comes back."""
    model = tiny_model(20, sliding_window=5, layer_types=("sliding_attention", "full_attention"))
    gen = torch.Generator().manual_seed(20)
    lengths = [7, 8, 9, 8, 2, 3, 3, 16]
    requests = [(torch.randint(1, 27, (n,), generator=gen).tolist(), 5) for n in lengths]
    cache = model.new_paged_cache(num_blocks, block_size=4, seed=0)
    assert cache.block_size == 4
    scheduler = Scheduler(model, cache)
    shapes = record_forwards(model)
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    prefills = [shape for shape in shapes if shape[1] > 1]
    # a preempted request is prefilled again, unless its cached prefix left one token
    preempted = sum(r.preemptions for r in handles)
    assert len(requests) <= sum(b for b, _ in prefills) <= len(requests) + preempted
    assert (preempted > 0) == (num_blocks == 9)
    assert ((4, 9) in prefills) == (num_blocks == 100)  # rows 7-9 long, padded to 9
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.finish_reason == "length"
        assert request.token_ids == alone(model, prompt, n)
    assert [c.num_free_blocks for c in cache.caches] == [num_blocks] * 2


def test_padded_rows_that_do_not_fit_fall_back_to_one_prompt_at_a_time():
    model = tiny_model(17)
    gen = torch.Generator().manual_seed(17)
    # padded to 9 tokens the three rows need 9 blocks of 4; the pool has 8
    requests = [(torch.randint(1, 27, (n,), generator=gen).tolist(), 3) for n in (8, 8, 9)]
    scheduler = Scheduler(model, paged_for(model, 8))
    shapes = record_forwards(model)
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    # the three padded rows did not fit: the first prompt went alone, then the other two
    # (6 padded blocks beside its 2) together
    assert [shape for shape in shapes if shape[1] > 1] == [(1, 8), (2, 9)]
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.finish_reason == "length"
        assert request.token_ids == alone(model, prompt, n)
    assert scheduler.cache.num_free_blocks == 8


def test_an_error_in_a_batched_prefill_gives_its_blocks_back():
    model = tiny_model(18)

    def fail(_module, args):
        if args[0].shape[0] > 1 and args[0].shape[1] > 1:
            raise RuntimeError("out of memory")

    model.register_forward_pre_hook(fail)
    scheduler = Scheduler(model, paged_for(model, 20))
    for prompt in ([1, 2, 3], [4, 5, 6, 7]):
        scheduler.add(prompt, 2)
    with pytest.raises(RuntimeError, match="out of memory"):
        scheduler.step()
    assert scheduler.cache.num_free_blocks == 20 and not scheduler.cache.sequences
    assert len(scheduler.waiting) == 2 and not scheduler.running


def test_a_request_larger_than_the_whole_cache_finishes_with_an_error():
    model = tiny_model(14)
    scheduler = Scheduler(model, paged_for(model, num_blocks=4, block_size=4))  # 16 tokens
    small = scheduler.add([1, 2, 3], 4)
    huge = scheduler.add(list(range(1, 27)), 4)
    scheduler.run()
    assert huge.finish_reason == "error" and "does not fit" in huge.error
    assert small.finish_reason == "length" and small.token_ids == alone(model, [1, 2, 3], 4)


def test_a_request_that_outgrows_the_whole_cache_ends_with_an_error_not_a_loop():
    # 14 prompt tokens fit 4 blocks of 4, and 2 new tokens; the 17th token does not fit even
    # alone. Preempted and recomputed it would fail again forever (it used to).
    model = tiny_model(14)
    scheduler = Scheduler(model, paged_for(model, num_blocks=4, block_size=4))
    request = scheduler.add(list(range(1, 15)), 6)
    for _ in range(20):
        if not (scheduler.waiting or scheduler.running):
            break
        scheduler.step()
    assert request.finish_reason == "error" and "outgrew the whole cache" in request.error
    assert request.token_ids == alone(model, list(range(1, 15)), 6)[:2]
    assert request.preemptions == 0 and scheduler.cache.num_free_blocks == 4


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
