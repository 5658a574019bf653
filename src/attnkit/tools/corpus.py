"""The embedded evaluation corpus: the Python standard library's own documentation text.

`pydoc_data.topics` ships with every CPython (about 465k characters of English prose and
code), so evaluations need no download and read the same text on every machine.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit._checks import check_positive_int


def corpus_text() -> str:
    """The pydoc topics, in sorted topic order, separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def corpus_tokens(tokenizer, n_tokens: int | None = None) -> Tensor:
    """The corpus as a 1-D int64 tensor of token ids (the first `n_tokens` if given).

    `tokenizer` is a Hugging Face tokenizer (as `load_model` returns); no BOS is added.
    """
    ids = tokenizer(corpus_text(), add_special_tokens=False)["input_ids"]
    if n_tokens is not None:
        check_positive_int("n_tokens", n_tokens)
        if n_tokens > len(ids):
            raise ValueError(f"n_tokens={n_tokens} is more than the corpus holds ({len(ids)})")
        ids = ids[:n_tokens]
    return torch.tensor(ids, dtype=torch.long)
