"""Decode attention straight from a paged K/V pool: one new query per sequence.

`PagedCache.update` gathers each sequence's blocks into a contiguous copy before attention;
at decode time that copy moves every cached byte twice. `paged_decode` reads the blocks in
place through the block table instead. Backends:

- `torch`: gather the blocks, then `attnkit.attention` with key padding on torch ops (the
  `tiled` backend; `reference` in float64). Any device and dtype; the baseline the kernels
  are tested against.
- `triton` (CUDA, or the Triton interpreter with `TRITON_INTERPRET=1` on CPU): a split-K
  kernel (FlashDecoding). Each program takes one sequence, one KV head with its whole query
  group folded into the tile's rows (GQA: K/V read once per group, not once per query head)
  and one slice of the context; the slices' partial outputs merge by their log-sum-exp.
- `cpp` (CPU tensors): the fused C++ kernel of `attnkit.ops.cpu_decode`, built on first use.
  The same split-K, GQA-folded walk through the block table as `triton`, with a work item per
  (sequence, context slice) streaming whole blocks (every KV head of a token at once);
  float32/float64 (float64 accumulates in float64), bfloat16/float16 widened on load. It
  checks lengths and block ids itself, always: it reads host memory directly.
- `auto`: `triton` for CUDA tensors when Triton is importable; `cpp` for CPU tensors when
  the kernel builds and no input requires grad (it has no backward); else `torch`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from attnkit.ops import cpu_decode
from attnkit.ops.attention import attention
from attnkit.ops.masks import from_tensor, padding
from attnkit.ops.transforms import needs_torch_ops
from attnkit.ops.triton_support import triton_unavailable

try:  # optional: CUDA kernels, or the interpreter on CPU
    from attnkit.ops.triton_paged import triton_paged_decode
except ImportError:  # pragma: no cover - triton is a dev dependency
    triton_paged_decode = None

BACKENDS = ("auto", "torch", "triton", "cpp")


def paged_decode(
    q: Tensor,
    k_pool: Tensor,
    v_pool: Tensor,
    block_table: Tensor,
    lengths: Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    num_splits: int | None = None,
    window: int | None = None,
    sinks: int = 0,
    return_lse: bool = False,
    check: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of one query per sequence over its cached keys, read through a block table.

    q: (batch, heads, head_dim). k_pool/v_pool: (num_blocks, block_size, kv_heads, head_dim
    / v_head_dim), one layer of `PagedCache.k_pool`/`v_pool`. block_table: (batch,
    max_blocks) integer block ids; row b's first ceil(lengths[b] / block_size) entries are
    used. lengths: (batch,) cached tokens per sequence (0 gives zeros and lse -inf).
    `num_splits` (triton, cpp): context slices per sequence, default chosen to fill the GPU
    or the CPU threads. `window` (a positive int): each query sees only its sequence's last
    `window` tokens and, with `sinks`, its first `sinks` tokens too (the layer's
    `sliding_window(window) | sinks(sinks)` at position `lengths[b] - 1`); the kernels read
    no other token, so table entries of blocks wholly between the sinks and the window may
    hold anything (a `PagedCache` with a window gives those blocks back). `check=False`
    skips the value checks (lengths and block ids in range), the one device sync: for an
    engine whose tables are valid by construction; shapes are always checked, and `cpp`
    checks values regardless (on the host, no sync).
    Returns (batch, heads, v_head_dim), and lse (batch, heads) with `return_lse`.
    """
    if backend in ("auto", "cpp"):  # the kernel's short way for a plain call on the CPU
        answer = cpu_decode.plain_paged_decode(
            q, k_pool, v_pool, block_table, lengths, scale, num_splits, window, sinks
        )
        if answer is not None:
            return answer if return_lse else answer[0]
    _check_shapes(q, k_pool, v_pool, block_table, lengths, backend, num_splits)
    check_window(window, sinks)
    window, sinks = None if window is None else int(window), int(sinks)  # numpy's, say
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend == "cpp":  # asked for by name: say why it cannot serve, if it cannot
        cpu_decode.check_request(q, k_pool, v_pool)
    elif backend == "auto":  # (its choice has checked the same)
        backend = choose_paged_backend(q, k_pool, v_pool)
    if backend == "cpp":  # values are checked inside, with the same messages
        out, lse = cpu_decode.cpp_decode(
            q, k_pool, v_pool, block_table, lengths, scale, num_splits, window=window, sinks=sinks
        )
        return (out, lse) if return_lse else out
    longest = _check_values(k_pool, block_table, lengths, window, sinks) if check else None
    if backend == "triton":
        _check_triton(q, k_pool, v_pool)
        out, lse = triton_paged_decode(
            q, k_pool, v_pool, block_table, lengths, scale, num_splits,
            window=window, sinks=sinks, longest=longest,
        )  # fmt: skip
    else:
        out, lse = _gathered(q, k_pool, v_pool, block_table, lengths, scale, longest, window, sinks)
    return (out, lse) if return_lse else out


def check_window(window: object, sinks: object) -> None:
    """`window` None or a positive int; `sinks` a non-negative int, 0 without a window
    (both below 2**63: the kernels count in 64 bits)."""
    if window is not None and not _integer_in(window, 1):
        raise ValueError(f"window must be an integer in [1, 2**63) or None, got {window!r}")
    if not _integer_in(sinks, 0):
        raise ValueError(f"sinks must be an integer in [0, 2**63), got {sinks!r}")
    if sinks and window is None:
        raise ValueError(f"sinks={sinks} needs a window: without one every token is seen")


def _integer_in(value: object, low: int) -> bool:
    return (
        isinstance(value, numbers.Integral) and not isinstance(value, bool) and low <= value < 2**63
    )


def choose_paged_backend(q: Tensor, k_pool: Tensor, v_pool: Tensor) -> str:
    """What `backend="auto"` runs for these inputs: "triton", "cpp" or "torch" (a gather)."""
    if q.is_cuda and triton_paged_decode is not None:  # it has no backward (nor tangents)
        return "torch" if needs_torch_ops(q, k_pool, v_pool) else "triton"
    if cpu_decode.can_take(q, k_pool, v_pool):
        return "cpp"
    return "torch"


def _check_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor) -> None:
    reason = triton_unavailable(q, triton_paged_decode is not None, (q, k_pool, v_pool))
    if reason is not None:
        raise ValueError(f"backend='triton' cannot serve this request: {reason}")


def _gathered(
    q, k_pool, v_pool, block_table, lengths, scale, longest, window=None, sinks=0
) -> tuple[Tensor, Tensor]:
    """The plain way: copy each sequence's blocks together, then attend with key padding
    (and the window's key mask)."""
    bs = k_pool.shape[1]
    if longest is None:  # the value checks were skipped, so nobody has read it yet
        longest = int(lengths.max()) if len(lengths) else 0
    n_blocks = max(1, -(-longest // bs))
    table = block_table[:, :n_blocks].long()
    # padding entries, and entries between the sinks and the window, may be junk
    table = torch.where(_in_use(table, lengths, bs, window, sinks), table, 0)
    k = k_pool[table].flatten(1, 2).transpose(1, 2)  # (B, Hkv, n_blocks·bs, d)
    v = v_pool[table].flatten(1, 2).transpose(1, 2)
    lengths = lengths.to(k.device)
    if window is None:
        mask = padding(lengths)
    else:
        mask = from_tensor(
            _seen(torch.arange(k.shape[2], device=k.device), lengths, window, sinks)[:, None, None]
        )
    out, lse = attention(
        q.unsqueeze(2), k, v, mask, scale=scale, return_lse=True, backend=torch_path_backend(q)
    )
    return out.squeeze(2), lse.squeeze(2)


def _seen(index: Tensor, lengths: Tensor, window: int | None, sinks: int) -> Tensor:
    """(batch, len(index)) True where token `index` of sequence b is one its query sees."""
    n = lengths[:, None]
    seen = index < n
    if window is not None:
        seen &= (index >= n - window) | (index < sinks)
    return seen


def torch_path_backend(q: Tensor) -> str:
    """The `attnkit.attention` backend of the `torch` paths here and in decode_attention:
    torch ops only, never the C++ decode kernel that `auto` would pick on CPU (a `torch`
    answer is the baseline the kernel is tested and timed against): `reference` in float64,
    else `tiled` (which returns the lse torch SDPA does not)."""
    return "reference" if q.dtype == torch.float64 else "tiled"


def _in_use(
    block_table: Tensor, lengths: Tensor, block_size: int, window: int | None = None, sinks: int = 0
) -> Tensor:
    """(batch, max_blocks) True where row b's entry holds some of the `lengths[b]` tokens
    its query sees (all of them without a window)."""
    lengths = lengths.to(block_table.device)
    first = torch.arange(block_table.shape[1], device=block_table.device) * block_size
    in_use = first < lengths[:, None]
    if window is not None:  # the block's last token in the window, or its first a sink
        in_use &= (first + block_size > lengths[:, None] - window) | (first < sinks)
    return in_use


def _check_shapes(q, k_pool, v_pool, block_table, lengths, backend, num_splits) -> None:
    check_tensors_and_options(
        [
            ("q", q),
            ("k_pool", k_pool),
            ("v_pool", v_pool),
            ("block_table", block_table),
            ("lengths", lengths),
        ],
        backend,
        BACKENDS,
        num_splits,
    )
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, heads, head_dim), got shape {tuple(q.shape)}")
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if pool.dim() != 4:
            raise ValueError(
                f"{name} must be (num_blocks, block_size, kv_heads, dim), got shape "
                f"{tuple(pool.shape)}"
            )
        if pool.dtype != q.dtype or pool.device != q.device:
            raise ValueError(
                f"{name} must match q's dtype and device ({q.dtype}, {q.device}), got "
                f"{pool.dtype} on {pool.device}"
            )
    b, h, d = q.shape
    if k_pool.shape[:3] != v_pool.shape[:3]:
        raise ValueError(
            f"k_pool and v_pool must agree on (num_blocks, block_size, kv_heads), got "
            f"{tuple(k_pool.shape[:3])} and {tuple(v_pool.shape[:3])}"
        )
    if k_pool.shape[3] != d:
        raise ValueError(f"k_pool head_dim {k_pool.shape[3]} must equal q's head_dim {d}")
    kv_heads = k_pool.shape[2]
    if h % kv_heads:
        raise ValueError(f"q's heads ({h}) must be a multiple of kv_heads ({kv_heads})")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.is_floating_point():
        raise ValueError(
            f"block_table must be integer (batch={b}, max_blocks), got {block_table.dtype} "
            f"{tuple(block_table.shape)}"
        )
    if lengths.shape != (b,) or lengths.is_floating_point():
        raise ValueError(
            f"lengths must be integer (batch={b},), got {lengths.dtype} {tuple(lengths.shape)}"
        )


def _check_values(
    k_pool: Tensor, block_table: Tensor, lengths: Tensor, window: int | None = None, sinks: int = 0
) -> int:
    """Lengths and the block ids in use within range; returns max(lengths). One device sync."""
    if lengths.numel() == 0:
        return 0
    bs, num_blocks = k_pool.shape[1], k_pool.shape[0]
    capacity = block_table.shape[1] * bs
    big = torch.iinfo(torch.int64).max
    stats = [lengths.min().long(), lengths.max().long()]
    if block_table.shape[1]:  # a table of no columns has no entry to check (lengths must be 0)
        in_use = _in_use(block_table, lengths, bs, window, sinks)
        stats += [
            torch.where(in_use, block_table.long(), big).min(),
            torch.where(in_use, block_table.long(), -1).max(),
        ]
    low, longest, *ids = torch.stack(stats).tolist()
    first, last = ids or (big, -1)
    if low < 0 or longest > capacity:
        raise ValueError(
            f"lengths must lie in [0, max_blocks * block_size = {capacity}], got [{low}, {longest}]"
        )
    if last >= 0 and (first < 0 or last >= num_blocks):
        raise ValueError(
            f"block_table entries in use must lie in [0, {num_blocks}), got [{first}, {last}]"
        )
    return longest


def check_tensors_and_options(named, backend: str, backends: tuple, num_splits) -> None:
    """The checks every decode entry point starts with: tensors, backend name, num_splits."""
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}, got {backend!r}")
    if num_splits is not None and (
        isinstance(num_splits, bool)
        or not isinstance(num_splits, int)
        or not 1 <= num_splits < 2**63  # the kernels take a 64-bit count
    ):
        raise ValueError(
            f"num_splits must be a positive integer or None, got {num_splits!r} (the kernels "
            "count in 64 bits: at most 2**63 - 1)"
        )
