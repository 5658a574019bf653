"""Continuous batching: every request's greedy output equals its output alone, under
preemption, prefix sharing, chunked and batched prefill and batching, in paged pools and in
caches of per-sequence slots (contiguous K/V, rings, MLA latents, linear attention's state);
a request too large errors."""

from __future__ import annotations

import pytest
import torch
from test_generate import DigitTokenizer, tiny_model

from attnkit.cache import (
    ContiguousCache,
    H2OCache,
    LatentCache,
    LayeredCache,
    LinearStateCache,
    QuantizedCache,
    SlidingWindowCache,
    StreamingLLMCache,
)
from attnkit.cache.paged import PagedCache
from attnkit.engine import generate
from attnkit.engine.scheduler import Scheduler
from attnkit.layers.latent import LatentAttention
from attnkit.layers.linear import LinearAttention
from attnkit.models.llama import Transformer


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
    # alone. Preempted and recomputed it would fail again forever (it used to). It keeps the
    # 3 tokens it generated: 2 stored, and the one sampled from all 16.
    model = tiny_model(14)
    scheduler = Scheduler(model, paged_for(model, num_blocks=4, block_size=4))
    request = scheduler.add(list(range(1, 15)), 6)
    for _ in range(20):
        if not (scheduler.waiting or scheduler.running):
            break
        scheduler.step()
    assert request.finish_reason == "error" and "outgrew the whole cache" in request.error
    assert request.token_ids == alone(model, list(range(1, 15)), 6)[:3]
    assert request.preemptions == 0 and scheduler.cache.num_free_blocks == 4


def with_attention(seed: int, layer):
    """`tiny_model(seed)`'s config with attention layers `layer(config, i)`, in float64."""
    torch.manual_seed(seed)
    return Transformer(tiny_model().config, attention=layer).double().eval()


def slot_model(kind: str):
    """A tiny model whose `new_cache` gives a cache of per-sequence slots of `kind`."""
    if kind == "ring":
        return tiny_model(22, sliding_window=5)
    if kind == "latent":
        return with_attention(
            23,
            lambda c, i: LatentAttention(
                i, c.hidden_size, 6, kv_rank=8, rope_dim=4, nope_dim=4, v_head_dim=6
            ),
        )
    if kind == "linear":
        return with_attention(24, lambda c, i: LinearAttention(i, c.hidden_size, 6, 2, 6))
    if kind == "layered":  # a ring for the windowed layer, K/V for the global one
        return tiny_model(29, sliding_window=5, layer_types=("sliding_attention", "full_attention"))
    return tiny_model(21)


SLOT_CACHES = {
    "contiguous": ContiguousCache,
    "ring": SlidingWindowCache,
    "latent": LatentCache,
    "linear": LinearStateCache,
    "layered": LayeredCache,
}


@pytest.mark.parametrize("kind", list(SLOT_CACHES))
def test_caches_of_sequence_slots_serve_each_request_as_alone(kind):
    """12 requests, at most 8 at once, through a cache of 3 slots: the rest wait for a slot
    (they used to crash the scheduler with CacheFull; a LayeredCache's groups then fell out
    of step, having used up different numbers of sequence ids). Short prompts go together
    in right-padded rows where `truncate` takes the padding back (every kind but linear
    attention's running sums); prompts and answers run past the ring's window of 5."""
    model = slot_model(kind)
    cache = model.new_cache(0, max_seqs=3)
    assert type(cache) is SLOT_CACHES[kind]
    requests = workload(25)
    scheduler = Scheduler(model, cache, max_batch=8)
    shapes = record_forwards(model)
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    assert max(b for b, _ in shapes) == 3  # never more at once than the slots
    batched_prefill = max(b for b, n in shapes if n > 1) > 1  # padded rows, taken back after
    assert batched_prefill == (kind != "linear")
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.finish_reason == "length" and request.preemptions == 0
        assert request.token_ids == alone(model, prompt, n)
    assert max(len(p) + n for p, n in requests) > 2 * 5
    assert not cache.sequences  # every slot came back


def test_a_ring_prefills_together_only_rows_that_fit_one_of_its_steps():
    """A ring of `max_new_per_step=4` takes a longer row in steps; padding over more than
    its last step could not always be taken back, so 6-token prompts go alone."""
    model = tiny_model(28, sliding_window=5)
    cache = model.new_cache(0, max_seqs=4, max_new_per_step=4)
    requests = [([1, 2, 3], 3), ([4, 5, 6, 7], 3), ([8, 9, 1, 2, 3, 4], 3), ([5, 6, 7, 8, 9, 1], 3)]
    scheduler = Scheduler(model, cache, prefill_chunk=16)
    shapes = record_forwards(model)
    handles = [scheduler.add(prompt, n) for prompt, n in requests]
    scheduler.run()
    assert [shape for shape in shapes if shape[1] > 1] == [(2, 4), (1, 6), (1, 6)]
    for (prompt, n), request in zip(requests, handles, strict=True):
        assert request.token_ids == alone(model, prompt, n)


@pytest.mark.parametrize("kind", ["contiguous", "latent"])
def test_a_request_past_max_len_ends_with_an_error_while_the_others_go_on(kind):
    """A cache of max_len 12: the request that reaches 12 tokens ends with an error and
    keeps what it generated; no other request is preempted to make room (none would), and
    one whose prompt alone is longer ends at once, not when the cache empties."""
    model = slot_model(kind)
    cache = model.new_cache(0, max_seqs=4, max_len=12)
    scheduler = Scheduler(model, cache)
    short = [scheduler.add([3, 4, 5], 6), scheduler.add([6, 7], 8)]
    long = scheduler.add([1, 2, 3, 4, 5, 6, 7, 8], 10)
    huge = scheduler.add(list(range(1, 14)), 2)
    scheduler.step()
    assert huge.finish_reason == "error" and "does not fit" in huge.error
    assert "max_len is 12" in huge.error and len(scheduler.running) == 3
    scheduler.run()
    assert long.finish_reason == "error" and "outgrew" in long.error
    # 8 prompt tokens + 4 fed back = 12 positions, and the 5th sampled from them all
    assert long.token_ids == alone(model, [1, 2, 3, 4, 5, 6, 7, 8], 10)[:5]
    assert "room for one sequence after 5 new tokens" in long.error
    for request, prompt in zip(short, ([3, 4, 5], [6, 7]), strict=True):
        assert request.finish_reason == "length" and request.preemptions == 0
        assert request.token_ids == alone(model, prompt, request.max_new_tokens)
    assert not cache.sequences


def test_a_prompt_past_max_len_among_short_ones_ends_and_the_rest_prefill_together():
    """Its row fails the batched prefill (the limit is found only there): it ends with an
    error, and the short prompts go together again rather than one at a time."""
    model = tiny_model(30)
    cache = model.new_cache(0, max_seqs=16, max_len=12)
    scheduler = Scheduler(model, cache)
    shapes = record_forwards(model)
    short = [scheduler.add([i + 1, 2, 3], 2) for i in range(8)]
    long = scheduler.add(list(range(1, 14)), 2)
    scheduler.step()
    assert long.finish_reason == "error" and "does not fit" in long.error
    prefills = [shape for shape in shapes if shape[1] > 1]
    assert prefills[-1] == (8, 3) and all(b == 8 for b, _ in prefills) and len(prefills) <= 2
    scheduler.run()
    for request in short:
        assert request.token_ids == alone(model, request.prompt_ids, 2)


@pytest.mark.parametrize(
    ("cache_type", "undoes"),
    [
        (PagedCache, True),
        (ContiguousCache, True),
        (LatentCache, True),
        (SlidingWindowCache, True),
        (QuantizedCache, False),  # its error statistics would count the padding
        (H2OCache, False),  # padded queries would add to the attention mass it evicts by
        (StreamingLLMCache, True),  # a configuration of the ring
        (LinearStateCache, False),  # a running sum cannot forget tokens
    ],
)
def test_which_caches_take_padding_back(cache_type, undoes):
    """Only the caches whose `truncate` leaves what was never written get batched padded
    prefill; a subclass does not inherit the claim."""
    assert cache_type.undoes_last_step is undoes


def test_slots_taken_outside_the_scheduler_end_requests_with_an_error():
    """`new_cache(2)` holds two sequences of its own: with both slots in use and nothing
    running, a request cannot ever start; it ends with an error naming the slots."""
    model = tiny_model(27)
    scheduler = Scheduler(model, model.new_cache(2))
    request = scheduler.add([1, 2, 3], 4)
    scheduler.run()
    assert request.finish_reason == "error"
    assert "all 2 sequence slots are in use" in request.error and request.token_ids == []


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
