"""Attention masks: `attnkit.masks.causal() & attnkit.masks.sinks(4)` and friends."""

from attnkit.ops.masks import (
    BlockSummary,
    Mask,
    block_sparse,
    causal,
    chunked,
    document,
    from_tensor,
    padding,
    padding_lengths,
    prefix_lm,
    sinks,
    sliding_window,
    strided,
)

__all__ = [
    "BlockSummary",
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
    "strided",
]
