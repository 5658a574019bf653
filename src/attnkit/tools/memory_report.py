"""The whole `attnkit memory` report for one model, as a JSON-ready dict, and `parse_size`."""

from __future__ import annotations

import math

from attnkit.tools.memory import (
    KVSpec,
    kv_bytes,
    kv_bytes_per_token,
    kv_bytes_per_token_layer,
    max_batch,
    max_context,
    weights_bytes,
)
from attnkit.tools.variants import what_if_table

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """Bytes from '80GB' (10^9), '80GiB' (2^30), '512MB', '1e9B'; a bare number means GB."""
    cleaned = text.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if cleaned.endswith(u)), "GB")
    number = cleaned[: len(cleaned) - len(unit)] if cleaned.endswith(unit) else cleaned
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"expected a size such as 80GB or 24GiB, got {text!r}") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"expected a positive size such as 80GB, got {text!r}")
    return int(value)


def per_layer_bytes_per_token(spec: KVSpec, dtype: str = "bf16") -> list[dict]:
    """One row per layer: its KV bytes per token and whether a sliding window caps it."""
    per_layer = kv_bytes_per_token_layer(spec, dtype)
    if spec.window is None:
        windowed: set[int] = set()
    elif spec.window_layers is None:
        windowed = set(range(spec.layers))
    else:
        windowed = set(spec.window_layers)
    return [
        {"layer": i, "bytes_per_token": per_layer, "windowed": i in windowed}
        for i in range(spec.layers)
    ]


def memory_report(
    spec: KVSpec,
    *,
    context: int,
    batch: int = 1,
    dtype: str = "bf16",
    gpu_bytes: int | None = None,
    weights_dtype: str = "bf16",
    image_tokens: int = 0,
    variants: list[str] | None = None,
) -> dict:
    """Everything `attnkit memory` shows, as a JSON-ready dict.

    Image tokens are cached like text ones: per-request figures use `context + image_tokens`
    tokens, and `max_context` counts the text tokens that fit beside them.
    `variants=None` gives the default what-if table, else as shipped plus those variants.
    """
    if isinstance(image_tokens, bool) or not isinstance(image_tokens, int) or image_tokens < 0:
        raise ValueError(f"image_tokens must be an integer >= 0, got {image_tokens!r}")
    tokens = context + image_tokens
    weights = None if spec.params is None else weights_bytes(spec, weights_dtype)
    report = {
        "model": spec.name,
        "spec": {k: v for k, v in spec.__dict__.items() if k != "name"},
        "dtype": dtype,
        "weights_dtype": weights_dtype,
        "context": context,
        "image_tokens": image_tokens,
        "tokens_per_request": tokens,
        "batch": batch,
        "kv_bytes_per_token_per_layer": kv_bytes_per_token_layer(spec, dtype),
        "kv_bytes_per_token": kv_bytes_per_token(spec, dtype),
        "per_layer_bytes_per_token": per_layer_bytes_per_token(spec, dtype),
        "windowed_layers": spec.n_window_layers,
        "kv_bytes_per_request": kv_bytes(spec, tokens, 1, dtype),
        "kv_bytes_batch": kv_bytes(spec, tokens, batch, dtype),
        "weights_bytes": weights,
        "gpu_bytes": gpu_bytes,
        "max_batch": None,
        "max_context": None,
        "max_context_unbounded": False,
        "what_if": what_if_table(spec, tokens, dtype, variants),
    }
    if report["spec"]["window_layers"] is not None:
        report["spec"]["window_layers"] = list(spec.window_layers)
    if gpu_bytes is not None:
        if weights is None:
            raise ValueError(
                f"{spec.name}: the parameter count is unknown, so the weights' "
                "share of --gpu-memory is too"
            )
        report["max_batch"] = max_batch(spec, tokens, gpu_bytes, dtype, weights_dtype)
        longest = max_context(spec, batch, gpu_bytes, dtype, weights_dtype)
        report["max_context"] = None if longest is None else max(longest - image_tokens, 0)
        report["max_context_unbounded"] = longest is None
    return report
