"""Measure every KV strategy on one model: memory, perplexity, passkey retrieval, speed.

Every strategy reads the same tokens: calibration (for conversions) from the start of the
corpus, evaluation segments right after it. Each segment (as long as the row's longest
context) streams through a fresh, growing cache of the strategy, scoring every token after
the first, so a window or eviction policy is judged on exactly what it keeps. Streaming is
causal, so the perplexity at a shorter context C is that of the segment's first C tokens,
and the cache's `nbytes` after C tokens is read on the way; both come from one pass. KV bytes
are cross-checked with `attnkit memory`'s predictors.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from attnkit.models.llama import Transformer
from attnkit.tools.compare.strategies import Strategy, parse
from attnkit.tools.corpus import corpus_tokens
from attnkit.tools.passkey import passkey_accuracy
from attnkit.tools.perplexity import perplexity

# (strategy name, phase, done, total): the CLI turns these into a progress display.
Progress = Callable[[str, str, int, int], None]

DEFAULT_STRATEGIES = (
    "shipped",
    "mha",
    "mqa",
    "mla:256",
    "mla:128",
    "window:256",
    "window:1024",
    "sinks:256",
    "sinks:1024",
    "h2o:256",
    "int8",
    "rope:none",
    "rope:linear",
    "rope:dynamic",
    "rope:yarn",
)
QUICK_STRATEGIES = ("shipped", "mha", "mqa", "mla:128", "window:128", "sinks:128", "int8")


@dataclass(frozen=True)
class CompareSettings:
    """Everything a run depends on; recorded in the report so it can be repeated."""

    model: str = "smollm2-135m"
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    contexts: tuple[int, ...] = (512, 2048, 8192)
    segments: int = 1  # corpus segments, each as long as the longest context
    extension_context: int = 10240  # RoPE rows: past the 8k training length
    extension_factor: float = 2.0
    passkey_lengths: tuple[int, ...] = (1024, 2048)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    # RoPE rows: the passkey only past the training length, at these depths
    passkey_extension_length: int = 10240
    passkey_extension_depths: tuple[float, ...] = (0.1, 0.5)
    passkey_trials: int = 1
    calibration_tokens: int = 2048
    step_tokens: int = 256  # tokens per cache step (prefill chunk)
    speed_prompt_tokens: int = 512
    speed_decode_tokens: int = 16
    speed_repeats: int = 3
    seed: int = 0
    text_file: str | None = None

    def __post_init__(self) -> None:
        # Caches take `step_tokens` per forward; perplexity and memory are read at the end of
        # a step, so every context must be a whole number of steps.
        for name, values in (
            ("contexts", self.contexts),
            ("extension_context", (self.extension_context,)),
        ):
            bad = [c for c in values if c < self.step_tokens or c % self.step_tokens]
            if bad:
                raise ValueError(
                    f"{name} must be multiples of the cache step ({self.step_tokens} tokens), "
                    f"got {bad[0]}"
                )

    @classmethod
    def quick(cls, **overrides) -> CompareSettings:
        """A few strategies on short contexts: minutes on 2 CPU cores (smoke tests, CI)."""
        settings = cls(
            strategies=QUICK_STRATEGIES,
            contexts=(256, 512),
            segments=1,
            passkey_lengths=(384,),
            passkey_depths=(0.2, 0.8),
            calibration_tokens=512,
            step_tokens=128,
            speed_prompt_tokens=128,
            speed_decode_tokens=8,
            speed_repeats=1,
        )
        return replace(settings, **overrides)


@dataclass
class StrategyResult:
    """One row: what the strategy costs and what it keeps."""

    name: str
    label: str
    family: str
    contexts: list[int] = field(default_factory=list)
    kv_bytes: dict[int, int] = field(default_factory=dict)  # real nbytes after C tokens
    predicted_kv_bytes: dict[int, int] = field(default_factory=dict)  # attnkit memory's
    perplexity: dict[int, float] = field(default_factory=dict)
    scored_tokens: dict[int, int] = field(default_factory=dict)
    position_perplexity: dict[str, list[float]] = field(default_factory=dict)
    passkey: dict = field(default_factory=dict)
    prefill_seconds: float = math.nan
    decode_tokens_per_second: float = math.nan
    build_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def kv_bytes_per_token(self) -> float:
        """At the longest context measured: nbytes / tokens (bounded caches amortise)."""
        longest = max(self.kv_bytes)
        return self.kv_bytes[longest] / longest

    @property
    def memory_check(self) -> bool:
        """Did `attnkit memory`'s prediction equal every real allocation?"""
        return self.kv_bytes == self.predicted_kv_bytes

    def as_dict(self) -> dict:
        out = asdict(self)
        out["kv_bytes_per_token"] = self.kv_bytes_per_token
        out["memory_check"] = self.memory_check
        return out


def machine() -> dict:
    """Where the numbers come from."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def load_corpus(tokenizer, settings: CompareSettings) -> Tensor:
    """The evaluation tokens: the embedded pydoc corpus, or `settings.text_file`."""
    if settings.text_file is None:
        return corpus_tokens(tokenizer)
    with open(settings.text_file, encoding="utf-8") as f:
        text = f.read()
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def check_corpus(corpus: Tensor, settings: CompareSettings, strategies: list[Strategy]) -> None:
    longest = max(settings.contexts)
    if any(s.extends_context for s in strategies):
        longest = max(longest, settings.extension_context)
    needed = settings.calibration_tokens + settings.segments * longest
    if corpus.numel() < needed:
        raise ValueError(
            f"the text has {corpus.numel()} tokens; these settings need {needed} "
            f"(calibration {settings.calibration_tokens} + {settings.segments} segments of "
            f"{longest}): give a longer --text or shorter --contexts"
        )


def evaluate_strategy(
    strategy: Strategy,
    shipped: Transformer,
    tokenizer,
    corpus: Tensor,
    settings: CompareSettings,
    progress: Progress | None = None,
) -> StrategyResult:
    """Build the strategy's model, then measure memory, perplexity, passkey and speed."""
    start = time.perf_counter()
    report = (lambda *a: progress(strategy.name, *a)) if progress else (lambda *a: None)
    result = StrategyResult(strategy.name, strategy.label, strategy.family)
    report("building model", 0, 1)
    calibration = corpus[: settings.calibration_tokens]
    model = strategy.model(shipped, calibration)
    result.build_seconds = time.perf_counter() - start
    step = settings.step_tokens

    contexts = list(settings.contexts)
    if strategy.extends_context:
        contexts.append(settings.extension_context)
    result.contexts = contexts
    longest, start_token = max(contexts), settings.calibration_tokens
    # Tokens per forward: as many as every context boundary allows; ring and eviction caches
    # cap it at their `max_new_per_step` (the step), growing caches take it whole.
    chunk = math.gcd(*contexts)
    nll = torch.zeros(longest - 1, dtype=torch.float64)
    for s in range(settings.segments):
        segment = corpus[start_token + s * longest : start_token + (s + 1) * longest]
        measured, nbytes, per_forward = _stream(
            model, strategy, segment, contexts, (step, chunk), s, settings, report
        )
        nll += measured.nll
        result.kv_bytes = nbytes  # the same in every segment: sizes depend on lengths only
    for context in contexts:
        scored = settings.segments * (context - 1)
        result.perplexity[context] = math.exp(float(nll[: context - 1].sum()) / scored)
        result.scored_tokens[context] = scored
    for context in settings.contexts:  # memory at the extension context is not compared
        result.predicted_kv_bytes[context] = strategy.predict_nbytes(model, context, per_forward)
    result.kv_bytes = {c: result.kv_bytes[c] for c in settings.contexts}
    result.position_perplexity = _binned(nll / settings.segments)

    if strategy.extends_context:
        lengths, depths = [settings.passkey_extension_length], settings.passkey_extension_depths
    else:
        lengths, depths = list(settings.passkey_lengths), settings.passkey_depths
    room = max(lengths) + 16  # the prompt and the answer's tokens
    keys = passkey_accuracy(
        model,
        tokenizer,
        lengths=lengths,
        depths=depths,
        trials=settings.passkey_trials,
        seed=settings.seed,
        cache_factory=lambda: strategy.new_cache(model, room, step),
        chunk_size=chunk,
        progress=lambda d, t: report("passkey", d, t),
    )
    result.passkey = keys.as_dict()

    report("speed", 0, 1)
    result.prefill_seconds, result.decode_tokens_per_second = _speed(
        model, strategy, corpus, settings
    )
    report("speed", 1, 1)
    result.seconds = time.perf_counter() - start
    return result


def _stream(model, strategy, segment, contexts, steps, index, settings, report):
    """Perplexity of one segment through a fresh growing cache, and its nbytes at each context.

    `steps` = (the ring caches' step, the chunk fed per forward). Also returns the tokens
    the cache took per forward (the chunk, or its `max_new_per_step` if smaller).
    """
    (step, chunk), cache, nbytes = steps, None, {}
    total = settings.segments * (len(segment) - 1)

    def new_cache():
        nonlocal cache
        cache = strategy.new_cache(model, None, step)
        return cache

    def seen(done, _total):  # after each chunk: `done` tokens cached, as many targets scored
        if done in contexts:
            nbytes[done] = cache.nbytes
        report("perplexity", index * (len(segment) - 1) + done, total)

    measured = perplexity(model, segment, cache_factory=new_cache, chunk_size=chunk, progress=seen)
    with torch.no_grad():  # the last token is only a target; cache it too, for nbytes at C
        model(segment[-1:].view(1, 1), cache=cache)
    nbytes[len(segment)] = cache.nbytes
    missing = set(contexts) - set(nbytes)
    if missing:  # contexts are checked to be multiples of the step; this is a bug if reached
        raise RuntimeError(f"no cache snapshot at contexts {sorted(missing)} (step {step})")
    limit = cache.max_step_tokens
    return measured, nbytes, chunk if limit is None else min(chunk, limit)


def _binned(nll: Tensor, bins: int = 32) -> dict[str, list[float]]:
    """Perplexity per position bin (targets 1 .. n), for the perplexity-vs-position plot."""
    edges = torch.linspace(0, nll.numel(), bins + 1).round().long().tolist()
    centers, values = [], []
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            centers.append((lo + hi) / 2 + 1)
            values.append(math.exp(float(nll[lo:hi].mean())))
    return {"position": centers, "perplexity": values}


@torch.no_grad()
def _speed(model, strategy: Strategy, corpus: Tensor, settings: CompareSettings):
    """Median prefill seconds for the prompt, and decode tokens/s after it, through the cache."""
    prompt = corpus[: settings.speed_prompt_tokens].view(1, -1)
    n_decode = settings.speed_decode_tokens
    # One untimed prefill and decode step first: kernels compile and weights pack on their
    # first use (seconds, once per process), which timed the first row's speed, not its own.
    warm = strategy.new_cache(model, prompt.shape[1] + n_decode, settings.step_tokens)
    model(model(prompt, cache=warm)[:, -1:].argmax(-1), cache=warm)
    prefills, decodes = [], []
    for _ in range(settings.speed_repeats):
        cache = strategy.new_cache(model, prompt.shape[1] + n_decode, settings.step_tokens)
        start = time.perf_counter()
        logits = model(prompt, cache=cache)
        prefills.append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(n_decode):
            logits = model(logits[:, -1:].argmax(-1), cache=cache)
        decodes.append(n_decode / (time.perf_counter() - start))
    return statistics.median(prefills), statistics.median(decodes)


def run_compare(
    settings: CompareSettings, progress: Progress | None = None, *, loaded=None
) -> tuple[list[StrategyResult], dict]:
    """Every strategy of `settings`, in order; returns the rows and the run's metadata.

    `loaded` = (model, tokenizer) skips loading `settings.model` (tests pass a fixture).
    """
    from attnkit.models import load_model

    strategies = [
        parse(name, extension_factor=settings.extension_factor) for name in settings.strategies
    ]
    start = time.perf_counter()
    model, tokenizer = loaded if loaded is not None else load_model(settings.model)
    torch.manual_seed(settings.seed)
    corpus = load_corpus(tokenizer, settings)
    check_corpus(corpus, settings, strategies)
    rows = [evaluate_strategy(s, model, tokenizer, corpus, settings, progress) for s in strategies]
    meta = {
        "settings": asdict(settings),
        "machine": machine(),
        "corpus_tokens": corpus.numel(),
        "training_context": model.config.max_position_embeddings,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": time.perf_counter() - start,
    }
    return rows, meta
