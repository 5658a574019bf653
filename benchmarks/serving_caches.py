"""Continuous batching through each kind of cache, against the same requests one by one.

    PYTHONPATH=src python benchmarks/serving_caches.py [--quick] [--requests N] [--repeats N]

SmolLM2-135M (float32, 2 threads) and the same model converted to MLA (`to_mla`, latent
rank 128 + a 96-dim RoPE key, no calibration: the answers' quality does not enter here,
their length is fixed). N requests (16; 8 with `--quick`), prompts of 20-200 tokens cut
from Python's docs, answers of 8-96 greedy tokens (no stop token), all queued at once into
`Scheduler(max_batch=N)` over:

- `paged`: `new_paged_cache` (16-token blocks, as many as the workload needs, + N);
- `contiguous`: `new_cache(0, max_seqs=N)`, a slot of K/V per request;
- `mla latent`: the MLA model's `new_cache(0, max_seqs=N)`, a slot of latents per request;

against each model's `generate` on the requests one by one (the baseline: no batching),
and each cache's bytes per token over all layers.
`answers equal` says whether a run's answers equal the baseline's token for token (float32
rounding in a batch could tip a greedy choice; it is shown, not assumed).
Times are whole runs, medians of `--repeats`, the calls taken in turn within each round.
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console

from attnkit.engine.generate import generate
from attnkit.engine.scheduler import Scheduler
from attnkit.models.convert.mla import mla_kv_bytes_per_token, to_mla
from attnkit.tools.bench.core import Timer
from attnkit.tools.bench.endtoend import sample_prompts, smollm2
from tables import rows_table

MLA_RANK, MLA_ROPE_DIM, BLOCK = 128, 96, 16


def serve(model, cache, requests) -> list[list[int]]:
    scheduler = Scheduler(model, cache, max_batch=len(requests))
    for prompt, n in requests:
        scheduler.add(prompt, n)
    return [request.token_ids for request in scheduler.run()]


def one_by_one(model, tokenizer, requests) -> list[list[int]]:
    return [
        generate(model, tokenizer, prompt, n, stop_token_ids=())[0].token_ids
        for prompt, n in requests
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 requests")
    parser.add_argument("--requests", type=int, help="how many requests (16; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per call")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    n = args.requests or (8 if args.quick else 16)
    if n < 1 or args.repeats < 1:
        parser.error(f"--requests and --repeats must be >= 1, got {n} and {args.repeats}")
    console = Console(stderr=args.json, width=200)
    model, tokenizer = smollm2()
    mla = to_mla(model, MLA_RANK, rope_dim=MLA_ROPE_DIM)
    prompts = sample_prompts(tokenizer, n, seed=7)
    answers = torch.randint(8, 96, (n,), generator=torch.Generator().manual_seed(7)).tolist()
    requests = list(zip(prompts, answers, strict=True))
    blocks = sum(-(-(len(p) + a) // BLOCK) for p, a in requests) + n
    longest = max(len(p) + a for p, a in requests)

    answers_of: dict[str, list[list[int]]] = {}

    def run(name, fn):
        def call():
            answers_of[name] = fn()

        return call

    calls = {
        "paged": run("paged", lambda: serve(model, model.new_paged_cache(blocks), requests)),
        "contiguous": run(
            "contiguous",
            lambda: serve(model, model.new_cache(0, max_seqs=n, initial_len=longest), requests),
        ),
        "mla latent": run(
            "mla latent",
            lambda: serve(mla, mla.new_cache(0, max_seqs=n, initial_len=longest), requests),
        ),
        "gqa": run("gqa", lambda: one_by_one(model, tokenizer, requests)),
        "mla": run("mla", lambda: one_by_one(mla, tokenizer, requests)),
    }
    console.print(f"  {n} requests, {len(calls)} calls a round, {args.repeats} rounds", style="dim")
    seconds = dict(zip(calls, Timer(args.repeats).in_turn(*calls.values()), strict=True))
    new_tokens = sum(answers)
    rows = []
    for name, served, model_name, baseline in (
        ("paged", model, "SmolLM2-135M (GQA 9/3)", "gqa"),
        ("contiguous", model, "SmolLM2-135M (GQA 9/3)", "gqa"),
        ("mla latent", mla, f"MLA rank {MLA_RANK} + RoPE {MLA_ROPE_DIM}", "mla"),
    ):
        rows.append(
            {
                "model": model_name,
                "cache": name,
                "cache KiB/token": mla_kv_bytes_per_token(served) / 1024,
                "seconds": seconds[name],
                "new tok/s": new_tokens / seconds[name],
                "one by one s": seconds[baseline],
                "speed vs one by one": seconds[baseline] / seconds[name],
                "answers equal": str(answers_of[name] == answers_of[baseline]),
            }
        )
    title = (
        f"Continuous batching, {n} requests ({new_tokens} new tokens), float32, "
        f"{torch.get_num_threads()} threads, medians of {args.repeats}"
    )
    if args.json:
        print(json.dumps({title: rows}, indent=2))
    else:
        console.print(rows_table(title, rows))


if __name__ == "__main__":
    main()
