"""Rotary position embeddings (RoPE) and their context-extension scalings.

RoPE rotates each pair of query/key dims by ``position * inv_freq[i]`` so that q·k depends only
on the distance between positions (RoFormer, Su et al. 2021, arXiv:2104.09864). Scalings change
``inv_freq`` (and sometimes the cos/sin magnitude) to reach past the trained context:
linear position interpolation (Chen et al. 2023, arXiv:2306.15595), NTK-aware theta scaling
(bloc97, r/LocalLLaMA 2023) and its dynamic variant (emozilla 2023), YaRN (Peng et al. 2023,
arXiv:2309.00071) and Llama 3.1's frequency-band rule (Llama 3 Herd, arXiv:2407.21783).

Frequencies are computed in float32 with the same operations as Hugging Face transformers (and
Meta's reference code): checkpoints were trained with those float32 values, and an exactly
rounded float64 ``inv_freq`` differs by up to ~3e-7 relative, i.e. ~0.03 rad at position 1e5.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnkit._checks import check_positive_int


def _number(
    where: str, value: Any, low: float, *, inclusive: bool = True, low_name: str = ""
) -> None:
    """Raise ValueError unless ``value`` is a finite real number above ``low``."""
    real = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (real and (value >= low if inclusive else value > low)):
        bound = (">= " if inclusive else "> ") + (f"{low_name}={low}" if low_name else f"{low}")
        raise ValueError(f"{where} must be a finite number {bound}, got {value!r}")


_POSITIVE_FIELDS = ("beta_slow", "low_freq_factor", "mscale", "mscale_all_dim", "attention_factor")
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _default_inv_freq(theta: float | Tensor, dim: int) -> Tensor:
    """Unscaled RoPE frequencies ``theta ** (-2i / dim)``, float32, shape (dim // 2,)."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (theta**exponents)


def _ntk_theta(theta: float, ratio: float | Tensor, dim: int) -> float | Tensor:
    """NTK-aware base: stretch the lowest frequency by ``ratio`` and leave the highest alone."""
    if dim < 4:
        raise ValueError(f"NTK scaling needs rotary_dim >= 4 (exponent dim/(dim-2)), got {dim}")
    return theta * ratio ** (dim / (dim - 2))


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """No scaling; the base of every scaling config, which turns frequencies into scaled ones."""

    kind: ClassVar[str] = "none"

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            where, value = f"{type(self).__name__}.{name}", getattr(self, name)
            if name == "original_max_position_embeddings":
                check_positive_int(where, value)
            elif name == "factor":
                _number(where, value, 1.0)
            elif name in _POSITIVE_FIELDS and value is not None:
                _number(where, value, 0.0, inclusive=False)

    def inv_freq(self, theta: float, dim: int, seq_len: int = 0) -> Tensor:
        """Scaled inverse frequencies for ``dim`` rotary dims, float32, shape (dim // 2,)."""
        return _default_inv_freq(theta, dim)

    @property
    def attention_scaling(self) -> float:
        """Factor that cos and sin are multiplied by (attention logits scale by its square)."""
        return 1.0

    @classmethod
    def from_hf(
        cls, params: Mapping[str, Any] | None, max_position_embeddings: int | None = None
    ) -> RopeScaling:
        """Build from a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict.

        ``max_position_embeddings`` is the model config's value: Hugging Face uses it as dynamic
        NTK's original length and as the default ``original_max_position_embeddings``.
        ``rope_theta`` and ``partial_rotary_factor`` are RotaryEmbedding arguments, ignored here
        like any other key the scaling does not use.
        """
        params = dict(params or {})
        kind = params.get("rope_type", params.get("type", "default"))
        if "type" in params and params["type"] != kind:
            raise ValueError(f"rope_type={kind!r} and type={params['type']!r} disagree")
        kinds = {"default": RopeScaling, "none": RopeScaling} | {c.kind: c for c in _SCALINGS}
        if kind not in kinds:
            raise ValueError(f"unknown RoPE scaling type {kind!r}; allowed: {sorted(kinds)}")
        scaling_cls = kinds[kind]
        fields = scaling_cls.__dataclass_fields__
        if "original_max_position_embeddings" in fields:
            given, model = params.get("original_max_position_embeddings"), max_position_embeddings
            # HF's dynamic NTK reads the model's max_position_embeddings; the others default to it
            dynamic = scaling_cls is DynamicNTKScaling
            params["original_max_position_embeddings"] = (
                (model or given) if dynamic else (given or model)
            )
        kwargs = {k: v for k, v in params.items() if k in fields and v is not None}
        if scaling_cls is YarnScaling and not (
            kwargs.get("mscale") and kwargs.get("mscale_all_dim")
        ):
            # HF uses mscale only as a non-zero pair and ignores a lone (or zero) one; so do
            # we when loading, so that every checkpoint HF reads loads here too.
            kwargs.pop("mscale", None)
            kwargs.pop("mscale_all_dim", None)
        missing = [n for n, f in fields.items() if n not in kwargs and f.default is MISSING]
        if missing:
            raise ValueError(
                f"{kind!r} RoPE scaling needs {missing} in the dict (an original length may "
                f"also come from max_position_embeddings=), got {params}"
            )
        return scaling_cls(**kwargs)


@dataclass(frozen=True, kw_only=True)
class LinearScaling(RopeScaling):
    """Position interpolation: every frequency divided by ``factor`` (Chen et al. 2023)."""

    kind: ClassVar[str] = "linear"
    factor: float

    def inv_freq(self, theta: float, dim: int, seq_len: int = 0) -> Tensor:
        return _default_inv_freq(theta, dim) / self.factor


@dataclass(frozen=True, kw_only=True)
class NTKScaling(RopeScaling):
    """NTK-aware: theta multiplied by ``factor ** (d / (d - 2))`` (bloc97 2023)."""

    kind: ClassVar[str] = "ntk"
    factor: float

    def inv_freq(self, theta: float, dim: int, seq_len: int = 0) -> Tensor:
        return _default_inv_freq(_ntk_theta(theta, self.factor, dim), dim)


@dataclass(frozen=True, kw_only=True)
class DynamicNTKScaling(RopeScaling):
    """Dynamic NTK: theta grows with the current length once it passes the original one."""

    kind: ClassVar[str] = "dynamic"
    factor: float
    original_max_position_embeddings: int

    def inv_freq(self, theta: float, dim: int, seq_len: int = 0) -> Tensor:
        original = self.original_max_position_embeddings
        # HF's module passes a grown length as a tensor, which rounds the new base to float32
        length: int | Tensor = original if seq_len <= original else torch.tensor(seq_len)
        ratio = self.factor * length / original - (self.factor - 1)  # 1 at the original length
        return _default_inv_freq(_ntk_theta(theta, ratio, dim), dim)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature ``0.1 * mscale * ln(scale) + 1`` (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True, kw_only=True)
class YarnScaling(RopeScaling):
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin.

    Dims turning fewer than ``beta_slow`` times over the original context are interpolated
    (divided by ``factor``), those turning more than ``beta_fast`` times are kept; ``truncate``
    rounds the ramp's ends to whole dims. An explicit ``attention_factor``, or the pair
    ``mscale``/``mscale_all_dim`` (DeepSeek), replaces the cos/sin factor ``0.1 ln(factor) + 1``.
    """

    kind: ClassVar[str] = "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        _number(
            f"{owner}.beta_fast",
            self.beta_fast,
            self.beta_slow,
            inclusive=False,
            low_name="beta_slow",
        )
        if (self.mscale is None) != (self.mscale_all_dim is None):
            raise ValueError(
                f"{owner}.mscale={self.mscale!r} and {owner}.mscale_all_dim="
                f"{self.mscale_all_dim!r} must be given together or not at all"
            )
        if not isinstance(self.truncate, bool):
            raise ValueError(f"{owner}.truncate must be a bool, got {self.truncate!r}")

    @property
    def attention_scaling(self) -> float:
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale is not None and self.mscale_all_dim is not None:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(
                self.factor, self.mscale_all_dim
            )
        return _yarn_mscale(self.factor)

    def inv_freq(self, theta: float, dim: int, seq_len: int = 0) -> Tensor:
        def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times
            turns = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return dim * math.log(turns) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)  # HF clamps to dim - 1, not dim // 2 - 1
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1: keep the frequency (extrapolate), 0: interpolate
        pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
        extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (self.factor * pos_freqs)
        return interpolated * (1 - keep) + extrapolated * keep


@dataclass(frozen=True, kw_only=True)
class Llama3Scaling(RopeScaling):
    """Llama 3.1: long wavelengths interpolated, short ones kept, a smooth blend between."""

    kind: ClassVar[str] = "llama3"
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        super().__post_init__()
        where, low = f"{type(self).__name__}.high_freq_factor", self.low_freq_factor
        _number(where, self.high_freq_factor, low, inclusive=False, low_name="low_freq_factor")

    def inv_freq(self, theta: float, dim: int, seq_len: int = 0) -> Tensor:
        inv_freq = _default_inv_freq(theta, dim)
        original = self.original_max_position_embeddings
        low, high = self.low_freq_factor, self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # wavelengths above original / low are divided by factor, below original / high kept
        scaled = torch.where(wavelen > original / low, inv_freq / self.factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        medium = ~(wavelen < original / high) & ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled)


_SCALINGS = (LinearScaling, NTKScaling, DynamicNTKScaling, YarnScaling, Llama3Scaling)


def apply_rotary(
    x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool = False, phasors: Tensor | None = None
) -> Tensor:
    """Rotate the first ``2 * cos.shape[-1]`` dims of ``x``; the rest pass through.

    x: (batch, heads, seq, head_dim); cos, sin: (seq, r/2) or (batch, seq, r/2), one angle per
    pair. Half-split pairs dim i with i + r/2 (HF Llama); interleaved pairs 2i with 2i + 1
    (RoFormer, GGUF). Computes in the dtype of its arguments. ``phasors``, the
    interleaved layout's ``rotation_phasors(cos, sin)`` computed once per forward, turns
    the rotation into one complex multiply (a decode step rotates 2 tensors per layer, and
    the real-valued form costs ~4x the time in per-op overhead).
    """
    r = 2 * cos.shape[-1]
    if interleaved and phasors is not None and _complex_view_ok(x, r, phasors):
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * phasors).flatten(-2)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    if interleaved:
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., : r // 2], x[..., r // 2 : r]
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


def rotation_phasors(cos: Tensor, sin: Tensor) -> Tensor | None:
    """``cos + i·sin`` per (position, pair), (*cos.shape[:-2], 1, seq, r/2) to broadcast
    over heads; None for dtypes without a complex counterpart torch computes with
    (half precision), which keep the real-valued rotation."""
    if cos.dtype not in (torch.float32, torch.float64):
        return None
    return torch.complex(cos, sin).unsqueeze(-3)


def _complex_view_ok(x: Tensor, r: int, phasors: Tensor) -> bool:
    """Whether x's adjacent pairs can be read as complex numbers in place (all of x rotated,
    the phasors' precision, even strides)."""
    if x.shape[-1] != r or x.dtype != phasors.real.dtype or x.stride(-1) != 1:
        return False
    return x.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in x.stride()[:-1])


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for queries and keys, with any RopeScaling.

    ``inv_freq`` (rotary_dim // 2,) is a float32 buffer equal to Hugging Face's for the same
    config; keep it float32 (``module.to(torch.bfloat16)`` would round it). Dynamic NTK
    recomputes frequencies per call from ``max(positions) + 1`` and keeps no state.
    """

    inv_freq: Tensor

    def __init__(
        self,
        head_dim: int,
        theta: float = 10000.0,
        *,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        scaling: RopeScaling | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("RotaryEmbedding.head_dim", head_dim)
        _number("RotaryEmbedding.theta", theta, 1.0, inclusive=False)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not (
            isinstance(rotary_dim, int) and 2 <= rotary_dim <= head_dim and rotary_dim % 2 == 0
        ):
            raise ValueError(
                f"RotaryEmbedding.rotary_dim must be an even integer in [2, head_dim={head_dim}], "
                f"got {rotary_dim!r}"
            )
        self.head_dim, self.theta, self.rotary_dim = head_dim, float(theta), rotary_dim
        self.interleaved = bool(interleaved)
        self.scaling = scaling if scaling is not None else RopeScaling()
        self.attention_scaling = float(self.scaling.attention_scaling)
        self.register_buffer(
            "inv_freq", self.scaling.inv_freq(self.theta, rotary_dim), persistent=False
        )

    def inv_freq_at(self, seq_len: int) -> Tensor:
        """Frequencies used for a call whose largest position is ``seq_len - 1``."""
        scaling = self.scaling
        if (
            isinstance(scaling, DynamicNTKScaling)
            and seq_len > scaling.original_max_position_embeddings
        ):
            return scaling.inv_freq(self.theta, self.rotary_dim, seq_len).to(self.inv_freq.device)
        return self.inv_freq

    def cos_sin(
        self, positions: Tensor, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """cos and sin (already times ``attention_scaling``) of every position's angles.

        positions: integer (seq,) or (batch, seq), any values >= 0 in any order. Returns two
        tensors of shape (*positions.shape, rotary_dim // 2), computed in at least float32.
        """
        if positions.dtype not in _INT_DTYPES:
            raise ValueError(f"positions must be an integer tensor, got dtype {positions.dtype}")
        if positions.ndim not in (1, 2):
            raise ValueError(
                f"positions must be (seq,) or (batch, seq), got shape {tuple(positions.shape)}"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        seq_len = 0
        if positions.numel() > 0:
            smallest, largest = (int(v) for v in torch.aminmax(positions))
            if smallest < 0:
                raise ValueError(f"positions must be >= 0, got minimum {smallest}")
            seq_len = largest + 1
        compute = torch.promote_types(dtype, torch.float32)
        angles = positions[..., None].to(compute) * self.inv_freq_at(seq_len).to(compute)
        scale = self.attention_scaling
        return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)

    def forward(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate q (batch, heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim).

        positions: (seq,) or (batch or 1, seq). Computes in float32 or wider and returns each
        tensor in its own dtype.
        """
        for name, x in (("q", q), ("k", k)):
            if x.ndim != 4 or x.shape[-1] != self.head_dim:
                raise ValueError(
                    f"{name} must be (batch, heads, seq, head_dim={self.head_dim}), "
                    f"got shape {tuple(x.shape)}"
                )
        b, s = q.shape[0], q.shape[2]
        if (k.shape[0], k.shape[2]) != (b, s):
            raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or seq")
        if positions.shape[-1:] != (s,) or (
            positions.ndim == 2 and positions.shape[0] not in (1, b)
        ):
            raise ValueError(
                f"positions must be ({s},) or ({b} or 1, {s}), got {tuple(positions.shape)}"
            )
        if positions.device != q.device or k.device != q.device:
            raise ValueError(
                f"q, k, positions on different devices: {q.device}, {k.device}, {positions.device}"
            )
        compute = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
        cos, sin = self.cos_sin(positions, compute)
        q_rot = apply_rotary(q.to(compute), cos, sin, interleaved=self.interleaved)
        k_rot = apply_rotary(k.to(compute), cos, sin, interleaved=self.interleaved)
        return q_rot.to(q.dtype), k_rot.to(k.dtype)

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, theta={self.theta}, rotary_dim={self.rotary_dim}, "
            f"interleaved={self.interleaved}, scaling={self.scaling}"
        )
