"""What-if attention layouts for a model: the default table and `--variant` strings.

A variant is `(label, spec, kv dtype)`: the same model with another KV layout (MHA, GQA,
MQA, MLA), a sliding window on all or every other layer, or another KV precision.
"""

from __future__ import annotations

import math
from dataclasses import replace

from attnkit.tools.memory import DTYPE_BITS, KVSpec, kv_bytes, kv_bytes_per_token

WHAT_IF_WINDOW = 4096
WHAT_IF_MLA_RANKS = (256, 512)
WHAT_IF_DTYPES = ("fp8", "int4")
MLA_ROPE_DIM = 64

VARIANT_GRAMMAR = (
    "mha | mqa | gqa:KV_HEADS | mla:RANK | window:W | window-alternating:W | "
    f"kv:{'|'.join(DTYPE_BITS)}"
)

Variant = tuple[str, KVSpec, str]


def _plain(spec: KVSpec) -> KVSpec:
    return replace(spec, kv_rank=None, rope_dim=None, window=None, window_layers=None)


def mha(spec: KVSpec, dtype: str) -> Variant:
    return f"MHA ({spec.heads} KV heads)", replace(_plain(spec), kv_heads=spec.heads), dtype


def mqa(spec: KVSpec, dtype: str) -> Variant:
    return "MQA (1 KV head)", replace(_plain(spec), kv_heads=1), dtype


def gqa(spec: KVSpec, kv_heads: int, dtype: str) -> Variant:
    if spec.heads % kv_heads:
        raise ValueError(
            f"variant gqa:{kv_heads}: KV heads must divide the {spec.heads} query heads of "
            f"{spec.name}"
        )
    return f"GQA {kv_heads} KV heads", replace(_plain(spec), kv_heads=kv_heads), dtype


def mla(spec: KVSpec, rank: int, dtype: str) -> Variant:
    latent = replace(spec, kv_rank=rank, rope_dim=MLA_ROPE_DIM, window=None, window_layers=None)
    return f"MLA rank {rank} + RoPE {MLA_ROPE_DIM}", latent, dtype


def window_all(spec: KVSpec, window: int, dtype: str) -> Variant:
    return f"window {window}, all layers", replace(spec, window=window, window_layers=None), dtype


def window_alternating(spec: KVSpec, window: int, dtype: str) -> Variant:
    """A window on every other layer (even ones, as Gemma 2), global attention between."""
    layers = tuple(range(0, spec.layers, 2))
    windowed = replace(spec, window=window, window_layers=layers)
    return f"window {window}, every other layer", windowed, dtype


def what_if_variants(
    spec: KVSpec, dtype: str = "bf16", window: int = WHAT_IF_WINDOW
) -> list[Variant]:
    """The default what-if table's rows; the first is the model as shipped.

    Then MHA, GQA with every other power-of-two group count that divides the query heads,
    MQA, MLA at a few latent ranks (RoPE key 64, as DeepSeek), a sliding window on every
    layer and on every other layer, and lower-precision KV.
    """
    rows = [("as shipped", spec, dtype), mha(spec, dtype)]
    shipped_kv = None if spec.is_mla else spec.kv_heads
    for kv in (2**i for i in range(1, spec.heads.bit_length())):
        if spec.heads % kv == 0 and kv not in (spec.heads, shipped_kv):
            rows.append(gqa(spec, kv, dtype))
    rows.append(mqa(spec, dtype))
    rows.extend(mla(spec, rank, dtype) for rank in WHAT_IF_MLA_RANKS)
    for make in (window_all, window_alternating):
        row = make(spec, window, dtype)
        if (row[1].window, row[1].window_layers) != (spec.window, spec.window_layers):
            rows.append(row)
    rows.extend((f"KV {d}", spec, d) for d in WHAT_IF_DTYPES if d != dtype)
    return rows


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"variant {text!r}: {why}; expected one of: {VARIANT_GRAMMAR}")


def parse_variant(text: str, spec: KVSpec, dtype: str = "bf16") -> Variant:
    """One `--variant` string applied to `spec`, e.g. `gqa:4`, `mla:512`, `kv:int4`."""
    kind, sep, arg = text.strip().lower().partition(":")
    if kind in ("mha", "mqa"):
        if sep:
            raise _bad(text, f"{kind} takes no argument")
        return mha(spec, dtype) if kind == "mha" else mqa(spec, dtype)
    if kind == "kv":
        if arg not in DTYPE_BITS:
            raise _bad(text, f"KV dtype must be one of {', '.join(DTYPE_BITS)}, got {arg!r}")
        return f"KV {arg}", spec, arg
    makers = {
        "gqa": gqa,
        "mla": mla,
        "window": window_all,
        "window-alternating": window_alternating,
    }
    if kind not in makers:
        raise _bad(text, f"unknown kind {kind!r}")
    if not arg.isdigit() or int(arg) < 1:
        raise _bad(text, f"{kind} needs a positive integer after ':', got {arg!r}")
    return makers[kind](spec, int(arg), dtype)


def what_if_table(
    spec: KVSpec, context: int, dtype: str = "bf16", variants: list[str] | None = None
) -> list[dict]:
    """Rows of bytes per token, per request at `context`, and saving against as shipped.

    `variants=None` gives the default table; otherwise as shipped plus the named variants.
    """
    chosen = chosen_variants(spec, dtype, variants)
    shipped = kv_bytes(spec, context, 1, dtype)
    rows = []
    for label, variant, kv_dtype in chosen:
        request = kv_bytes(variant, context, 1, kv_dtype)
        rows.append(
            {
                "variant": label,
                "dtype": kv_dtype,
                "kv_bytes_per_token": kv_bytes_per_token(variant, kv_dtype),
                "kv_bytes_per_request": request,
                "saving": shipped / request if request else math.inf,
            }
        )
    return rows


def chosen_variants(spec: KVSpec, dtype: str, variants: list[str] | None) -> list[Variant]:
    """As shipped plus the named variants, or the default table's rows."""
    if variants is None:
        return what_if_variants(spec, dtype)
    return [("as shipped", spec, dtype)] + [parse_variant(v, spec, dtype) for v in variants]
