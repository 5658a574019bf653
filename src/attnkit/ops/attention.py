"""`attention()`: the one entry point, and how `backend="auto"` chooses."""

from __future__ import annotations

from torch import Tensor

from attnkit.ops import cpp_build
from attnkit.ops.backends import Backend, TiledBackend, get_backend
from attnkit.ops.backends.banded import SOURCE as BANDED_SOURCE
from attnkit.ops.backends.cpu_decode import plain_decode
from attnkit.ops.masks import Mask, causal
from attnkit.ops.problem import AttentionProblem, make_problem

# `auto` sends a masked problem to a block-skipping backend when skipping leaves at most
# this share of the 128 x 128 tiles and the problem is big enough for the skipping to pay:
# `gathered` (torch SDPA over each chunk's keys), or `tiled` where the log-sum-exp or a
# softcap is asked for. Measured on 2 CPU cores, torch 2.13, 8/2 heads, d 64, in ms
# (SDPA with a dense mask / tiled / gathered): window 256 at N=1024 16.8 / 14.1 / 7.8;
# window 512 at N=4096 333 / 72 / 47; window 1024 at N=4096 324 / 93 / 85; window 512
# at N=16384 — / 327 / 200 (benchmarks/attention.py and `attnkit bench` measure it).
SPARSE_MAX_DENSITY = 0.5
SPARSE_MIN_PAIRS = 1024 * 1024


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str | Backend = "auto",
    return_lse: bool = False,
    q_offset: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention for every variant, through one call.

    Shapes: q `(batch, heads, n_q, head_dim)`, k `(batch, kv_heads, n_k, head_dim)`,
    v `(batch, kv_heads, n_k, v_head_dim)`; `heads % kv_heads == 0` (MHA, GQA, MQA).
    Query row i sits at position `q_offset + i`, by default `n_k - n_q + i` (bottom-right
    alignment), which positional masks use. `softcap` applies `cap · tanh(s / cap)` to the
    scaled scores (Gemma 2). Returns the output `(batch, heads, n_q, v_head_dim)` and, with
    `return_lse=True`, also the natural-log log-sum-exp `(batch, heads, n_q)` of each row's
    scores. A row that sees no key gives zeros and lse -inf. Keys that no query may see
    never reach the arithmetic, so NaN stored there cannot leak into the output.
    """
    if backend == "auto" and mask is None and softcap is None and q_offset is None:
        answer = plain_decode(q, k, v, scale, return_lse)  # what `auto` would run, checked
        if answer is not None:  # in fewer steps (a decode loop's hot call)
            out, lse = answer
            return (out, lse) if return_lse else out
    problem = make_problem(q, k, v, mask, scale, softcap, q_offset, return_lse)
    chosen = _resolve(backend, problem)
    runnable = _drop_trivial_mask(problem)
    # None: no query sees any key (or there are no keys), so every row is the empty answer.
    out, lse = problem.empty_result() if runnable is None else chosen.run(runnable)
    return (out, lse) if return_lse else out


def choose_backend(problem: AttentionProblem) -> Backend:
    """The backend `auto` uses: the C++ decode kernel for one query row per sequence on CPU,
    the C++ banded kernel for sliding windows (+ sinks) on CPU and for causal masks where it
    was measured faster (see `_banded_wins_causal`); else torch SDPA unless block skipping or
    a feature needs `tiled`."""
    if problem.n_q == 1 and problem.q.device.type == "cpu":
        decode = get_backend("cpp_decode")
        if decode.unsupported(problem) is None:
            return decode
    if problem.mask is not None and problem.q.device.type == "cpu":
        banded = get_backend("banded")  # bands of keys per query block, read as stored
        if banded.unsupported(problem) is None and (
            problem.mask != causal() or _banded_wins_causal(problem)
        ):
            return banded
    sdpa, tiled = get_backend("sdpa"), get_backend("tiled")
    if sdpa.unsupported(problem) is not None:
        return tiled
    if problem.mask == causal() and problem.n_q == problem.n_k:
        return sdpa  # torch's is_causal kernel skips the upper triangle itself
    if problem.mask is not None and problem.n_q * problem.n_k >= SPARSE_MIN_PAIRS:
        blocks = tiled if isinstance(tiled, TiledBackend) else TiledBackend()
        summary = problem.mask.block_summary(
            problem.n_q, problem.n_k, blocks.block_q, blocks.block_k, problem.q_offset
        )
        # tiled skips a tile only if it is empty for every sequence of the batch
        computed = summary.nonempty.any(0).float().mean().item()
        if computed <= SPARSE_MAX_DENSITY:
            gathered = get_backend("gathered")
            return gathered if gathered.unsupported(problem) is None else tiled
    return sdpa


def _banded_wins_causal(p: AttentionProblem) -> bool:
    """Whether the banded kernel beats torch SDPA on this causal problem. Measured on a
    2-core Xeon (benchmarks/RESULTS.md): with AVX-512, 1.15-1.27x for prefill at 4k-16k and
    up to 2.6x for short ones (session 13); built for AVX2 against torch held to AVX2,
    1.05-1.42x (session 15). A chunk of a few rows against a long cache fills few of a
    block's lanes when heads are not grouped, so it needs a block's rows (32, AVX2 16) per
    KV head: 8/8 heads after 8k keys, AVX-512 2 rows 7.5 vs 1.9-3.1 ms; AVX2 8 rows 0.91x
    SDPA's speed, 16 rows 1.39x. Not timed on ARM or x86 without AVX2: there SDPA stays.
    Called once `banded` has said it can serve the problem (its kernel is built)."""
    if not cpp_build.has_wide_vectors():
        return False
    module = cpp_build.load_kernel(BANDED_SOURCE)
    return module is not None and p.n_q * p.group >= module.BLOCK_ROWS


def _resolve(backend: str | Backend, problem: AttentionProblem) -> Backend:
    if isinstance(backend, Backend):
        chosen = backend
    elif isinstance(backend, str):
        if backend == "auto":
            return choose_backend(problem)
        chosen = get_backend(backend)
    else:
        raise TypeError(f"backend must be a name or a Backend, got {type(backend).__name__}")
    reason = chosen.unsupported(problem)
    if reason is not None:
        raise ValueError(f"backend {chosen.name!r} cannot serve this request: {reason}")
    return chosen


def _drop_trivial_mask(p: AttentionProblem) -> AttentionProblem | None:
    """Drop a mask that hides nothing (causal decode); None if nothing is visible at all."""
    if p.n_q == 0 or p.n_k == 0:
        return None
    if p.mask is None:
        return p
    whole = p.mask.block_summary(p.n_q, p.n_k, p.n_q, p.n_k, p.q_offset, device=p.q.device)
    if not whole.nonempty.any():
        return None
    if whole.full.all():
        return AttentionProblem(p.q, p.k, p.v, None, p.scale, p.softcap, p.q_offset, p.return_lse)
    return p
