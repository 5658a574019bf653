"""The online-softmax pieces attnkit's Triton kernels share (FlashAttention's inner loop).

Scores enter in base 2 (the caller scales them by `scale · log2 e`), so every exponential
is one `exp2`; `finish_softmax` turns the running state back into natural-log lse.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores times scale · LOG2E are base-2 exponents


@triton.jit
def dot(a, b, EXACT: tl.constexpr):
    """a @ b in float32: full-precision products for float32 inputs (`EXACT`, not TF32),
    else the tensor cores' in b's dtype."""
    if EXACT:  # noqa: SIM108 - a compile-time branch, kept plain for Triton
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def softmax_step(m, l_sum, s):
    """Fold a tile of base-2 scores `s` (rows, keys; -inf where hidden) into the running
    max `m` and sum `l_sum`. Returns (new max, new sum, the factor that rescales the old
    accumulator, the tile's weights). A row that has seen no key yet keeps max -inf,
    sum 0 and weights 0, without NaN."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return m_new, l_sum * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def finish_softmax(m, l_sum, acc):
    """(output, natural-log lse) of an online softmax kept in base 2 (scores scaled by
    log2 e): acc / l, and (m + log2 l) · ln 2; rows that saw no key give 0 and -inf."""
    seen = l_sum > 0
    safe = tl.where(seen, l_sum, 1.0)
    lse = tl.where(seen, (m + tl.log2(safe)) * 0.6931471805599453, float("-inf"))
    return acc / safe[:, None], lse
