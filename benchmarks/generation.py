"""Generation on SmolLM2-135M: attnkit vs Hugging Face, and continuous batching vs baselines.

    python benchmarks/generation.py [--quick] [--markdown]

1. Decode tokens/s, float32, greedy, a fixed number of new tokens: attnkit `generate` vs
   transformers' `generate` on the same GGUF weights, batch 1 and 8; llama.cpp (4-bit
   Q4_1 weights, 2 threads, through llama-cpp-python) when it is installed.
2. 32 requests with mixed prompt and answer lengths: the continuous-batching scheduler over
   a PagedCache vs running them one by one vs static batches of 8 (`generate` on 8 prompts
   at a time, each batch running until its longest answer ends).
3. The paged cache's memory for that workload: bytes of the blocks held vs the bytes the
   held tokens need (the difference is block-rounding waste), sampled at every step.
4. Speculative decoding (prompt lookup; the first 8 layers as a draft model) vs plain
   greedy on a prompt whose answer copies its input: speedup, acceptance rate.
Every ratio compares figures measured in the same run; times are medians of --repeats.
"""

from __future__ import annotations

import argparse
import importlib.util
import pydoc_data.topics
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from attnkit.cache.paged import PagedCache
from attnkit.engine import generate
from attnkit.engine.scheduler import Scheduler
from attnkit.engine.speculative import (
    ModelDrafter,
    PromptLookupDrafter,
    SpeculativeStats,
    first_layers,
    speculative_generate,
)
from attnkit.models import load_model
from attnkit.models.loading import smollm2_path
from attnkit.tools.bench.endtoend import hf_generate_call, sample_prompts
from attnkit.tools.measure import median_seconds


def median_time(fn, repeats: int) -> float:
    """Median seconds of `repeats` timed runs after one untimed warm-up run."""
    return median_seconds(fn, repeats=repeats, warmup=1)


def prompts(tokenizer, n: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts of 20 to 200 tokens cut from Python's documentation."""
    return sample_prompts(tokenizer, n, seed)


def decode_rows(model, tokenizer, hf, repeats: int, new_tokens: int):
    for batch in (1, 8):
        batch_prompts = prompts(tokenizer, batch, seed=batch)
        ours = median_time(
            lambda batch_prompts=batch_prompts: generate(
                model, tokenizer, batch_prompts, new_tokens, stop_token_ids=()
            ),
            repeats,
        )
        hf_generate = hf_generate_call(hf, tokenizer.pad_token_id, batch_prompts, new_tokens)
        theirs = median_time(hf_generate, repeats)
        tokens = batch * new_tokens
        row = {
            "case": f"generate batch {batch}, {new_tokens} new tokens (fp32)",
            "attnkit tok/s": tokens / ours,
            "transformers tok/s": tokens / theirs,
            "attnkit / transformers": theirs / ours,
        }
        yield row


def llama_cpp_row(tokenizer, new_tokens: int, repeats: int):
    if importlib.util.find_spec("llama_cpp") is None:
        return {"case": "llama.cpp (Q4_1, 2 threads)", "note": "llama-cpp-python not installed"}
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm2_path()), n_threads=2, n_ctx=2048, verbose=False)
    prompt = prompts(tokenizer, 1, seed=1)[0]
    seconds = median_time(lambda: llm(tokenizer.decode(prompt), max_tokens=new_tokens), repeats)
    return {"case": "llama.cpp batch 1 (Q4_1 weights, 2 threads)", "tok/s": new_tokens / seconds}


def scheduler_rows(model, tokenizer, n_requests: int, repeats: int):
    reqs = list(
        zip(
            prompts(tokenizer, n_requests, seed=7),
            torch.randint(
                8, 96, (n_requests,), generator=torch.Generator().manual_seed(7)
            ).tolist(),
            strict=True,
        )
    )
    total_new = sum(n for _, n in reqs)
    c = model.config

    # The pool is allocated up front (as a server does), sized for the whole workload, and
    # fresh for every run so prefix blocks cached by one run cannot speed up the next.
    blocks = sum(-(-(len(p) + n) // 16) for p, n in reqs) + len(reqs)

    def new_cache():
        return PagedCache(
            c.num_hidden_layers, c.num_key_value_heads, c.head_dim, num_blocks=blocks, block_size=16
        )

    def continuous(cache, waste=None):
        scheduler = Scheduler(model, cache, max_batch=32)
        for prompt, n in reqs:
            scheduler.add(prompt, n)
        while scheduler.waiting or scheduler.running:
            scheduler.step()
            held = sum(cache.length(r._seq) for r in scheduler.running)
            if held and waste is not None:
                waste.append(cache.used_nbytes / (held * cache.block_nbytes / cache.block_size))

    def one_by_one():
        for prompt, n in reqs:
            generate(model, tokenizer, prompt, n, stop_token_ids=())

    def static_batches(size: int = 8):
        for i in range(0, len(reqs), size):
            group = reqs[i : i + size]
            longest = max(n for _, n in group)  # a static batch runs until its longest answer
            generate(model, tokenizer, [p for p, _ in group], longest, stop_token_ids=())

    waste: list[float] = []
    continuous(new_cache(), waste)  # warm-up (and the memory figures)
    runs = []
    for _ in range(repeats):
        cache = new_cache()
        start = time.perf_counter()
        continuous(cache)
        runs.append(time.perf_counter() - start)
    t_cont = statistics.median(runs)
    t_one = median_time(one_by_one, repeats)  # each includes its own warm-up run
    t_static = median_time(static_batches, repeats)
    yield {
        "case": f"{n_requests} mixed requests, continuous batching",
        "seconds": t_cont,
        "tok/s": total_new / t_cont,
        "speedup vs one by one": t_one / t_cont,
        "speedup vs static batches of 8": t_static / t_cont,
    }
    yield {"case": "  one by one", "seconds": t_one, "tok/s": total_new / t_one}
    yield {"case": "  static batches of 8", "seconds": t_static, "tok/s": total_new / t_static}
    yield {
        "case": "paged cache: held bytes / needed bytes (block rounding, 16-token blocks)",
        "median": statistics.median(waste),
        "max": max(waste),
    }


def speculative_rows(model, tokenizer, repeats: int, new_tokens: int):
    """Greedy decoding vs speculative decoding on a prompt whose answer copies its input."""
    source = pydoc_data.topics.topics["assert"][:600]
    prompt = f"Copy this text exactly.\n\n{source}\n\nCopy:\n"
    plain = median_time(
        lambda: generate(model, tokenizer, prompt, new_tokens, stop_token_ids=()), repeats
    )
    yield {"case": f"greedy, {new_tokens} tokens, copy task", "seconds": plain}
    drafters = {
        "prompt lookup": PromptLookupDrafter,
        "first 8 of 30 layers": lambda: ModelDrafter(first_layers(model, 8)),
    }
    for name, make in drafters.items():
        stats = SpeculativeStats()
        seconds = median_time(
            lambda make=make, stats=stats: speculative_generate(
                model,
                tokenizer,
                prompt,
                new_tokens,
                make(),
                num_draft=4,
                stop_token_ids=(),
                stats=stats,
            ),
            repeats,
        )
        yield {
            "case": f"speculative, {name} (4 drafted)",
            "seconds": seconds,
            "speedup": plain / seconds,
            "acceptance": stats.acceptance_rate,
            "tokens per pass": stats.tokens_per_pass,
        }


def render(title, rows, markdown, console):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: v if isinstance(v, str) else f"{v:.2f}"  # noqa: E731
    if markdown:
        print(f"\n### {title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
        for r in rows:
            print("| " + " | ".join(cell(r.get(c, "—")) for c in columns) + " |")
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c == "case" else "right")
    for r in rows:
        table.add_row(*(cell(r.get(c, "—")) for c in columns))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and requests")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=True)
    with console.status("loading models…"):
        model, tokenizer = load_model()
        from transformers import AutoModelForCausalLM

        path = smollm2_path()
        hf = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
    new_tokens = 16 if args.quick else 64
    with console.status("decode speed…"):
        decode = list(decode_rows(model, tokenizer, hf, args.repeats, new_tokens))
        decode.append(llama_cpp_row(tokenizer, new_tokens, args.repeats))
    with console.status("scheduler…"):
        # the 32-request workload is long: one timed run each (after a warm-up) is steady enough
        batching = list(scheduler_rows(model, tokenizer, 8 if args.quick else 32, 1))
    with console.status("speculative decoding…"):
        speculative = list(speculative_rows(model, tokenizer, args.repeats, new_tokens))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads")
    out = Console()
    render("Decode speed (greedy, float32 unless noted)", decode, args.markdown, out)
    render("Continuous batching", batching, args.markdown, out)
    render(
        "Speculative decoding (greedy; output equal to plain greedy)",
        speculative,
        args.markdown,
        out,
    )


if __name__ == "__main__":
    main()
