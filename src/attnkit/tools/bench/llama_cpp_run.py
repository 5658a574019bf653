"""llama.cpp's time for one greedy generation, measured in a child process.

`python -m attnkit.tools.bench.llama_cpp_run MODEL THREADS NEW_TOKENS REPEATS` reads a
prompt's text on stdin and prints `{"seconds": median}` over REPEATS calls after one
warm-up. A native crash of llama-cpp-python (a build for the wrong CPU features, say) ends
the child, not the bench that asked (`time_generation`).
"""

from __future__ import annotations

import json
import subprocess
import sys

from attnkit.tools.measure import median_seconds


def time_generation(
    model: str, prompt: str, threads: int, new_tokens: int, repeats: int
) -> float | str:
    """Median seconds of llama.cpp generating `new_tokens` after `prompt`, or why not."""
    command = [sys.executable, "-m", __name__, model, str(threads), str(new_tokens), str(repeats)]
    try:
        done = subprocess.run(command, input=prompt, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "llama.cpp did not finish in 600 s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"llama.cpp exited with code {done.returncode} ({last[:120]})"
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def main(argv: list[str]) -> None:
    model, threads, new_tokens, repeats = argv[0], *map(int, argv[1:4])
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_threads=threads, n_ctx=2048, verbose=False)
    prompt = sys.stdin.read()
    # greedy, and exactly `new_tokens`: end-of-text is banned, as attnkit's run stops on none
    never_stop = {llm.token_eos(): float("-inf")}

    def generate() -> None:
        llm.reset()  # no prefix reuse between repeats: each call prefills, as attnkit's does
        llm(prompt, max_tokens=new_tokens, temperature=0.0, logit_bias=never_stop)

    print(json.dumps({"seconds": median_seconds(generate, repeats=repeats, warmup=1)}))


if __name__ == "__main__":
    main(sys.argv[1:])
