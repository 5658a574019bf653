"""Attention masks as small values: predicates over (batch, query, key) with combinators.

A mask answers "may query row `q` see key `kv`?" Positional masks reason about absolute
positions: query row `i` sits at position `q_offset + i`, with `q_offset = n_k - n_q` by
default (bottom-right alignment, as FlashAttention), so decoding against a cache and
chunked prefill need no extra arguments. Key `j` sits at position `j`.

Every mask gives two views:
- `dense(n_q, n_k)`: a boolean tensor broadcastable to `(batch, 1, n_q, n_k)`;
- `block_summary(n_q, n_k, block_q, block_k)`: per tile, whether it is full, empty or
  partial, computed from the mask's definition without building the dense matrix. Tiled
  backends skip empty tiles and drop the mask on full ones, which is what makes a sliding
  window cost O(N·W) instead of O(N²).

Which masks include causality: `causal`, `sliding_window`, `strided` and `sinks` describe
what a query sees of the past (and so never see the future); `prefix_lm` is causal after
a bidirectional prefix (prefix rows also see later prefix keys);
`chunked`, `document`, `padding`, `block_sparse` and dense tensors do not — combine them
with `causal() & ...` for a decoder.

Summaries are conservative where exactness would cost too much: `nonempty` may say True
for a tile that is really empty, `full` may say False for a tile that is really full
(both only cost speed), never the other way round.
"""

from attnkit.ops.masks.base import BlockSummary, Geometry, Mask
from attnkit.ops.masks.positional import (
    causal,
    chunked,
    sinks,
    sliding_window,
    strided,
    window_and_sinks,
    window_and_sinks_mask,
    window_within,
)
from attnkit.ops.masks.tensors import (
    block_sparse,
    document,
    from_tensor,
    padding,
    padding_lengths,
    prefix_lm,
    split_block_sparse,
)

__all__ = [
    "BlockSummary",
    "Geometry",
    "Mask",
    "block_sparse",
    "causal",
    "chunked",
    "document",
    "from_tensor",
    "padding",
    "padding_lengths",
    "prefix_lm",
    "sinks",
    "sliding_window",
    "split_block_sparse",
    "strided",
    "window_and_sinks",
    "window_and_sinks_mask",
    "window_within",
]
