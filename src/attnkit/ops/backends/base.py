"""What a backend is, and the registry that `attention(backend=...)` looks names up in."""

from __future__ import annotations

from torch import Tensor

from attnkit.ops.problem import AttentionProblem


class Backend:
    """An implementation of attention. Subclasses set `name` and define both methods."""

    name: str = "?"

    def unsupported(self, problem: AttentionProblem) -> str | None:
        """Why this backend cannot serve `problem`, or None if it can."""
        return None

    def run(self, problem: AttentionProblem) -> tuple[Tensor, Tensor | None]:
        """Output `(batch, heads, n_q, v_head_dim)` and, if asked, lse `(batch, heads, n_q)`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attnkit backend {self.name!r}>"


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend, *, replace: bool = False) -> Backend:
    """Make `backend` available by name (optional backends call this only if importable).

    Replacing an existing name changes what every caller (and `auto`) gets, so it must be
    asked for with `replace=True`.
    """
    if backend.name in _REGISTRY and not replace:
        raise ValueError(
            f"a backend named {backend.name!r} is already registered; pass replace=True "
            "to replace it"
        )
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The registered backend called `name`."""
    if name not in _REGISTRY:
        allowed = ", ".join(["auto", *sorted(_REGISTRY)])
        raise ValueError(f"backend must be one of {allowed}; got {name!r}")
    return _REGISTRY[name]


def available_backends() -> list[str]:
    """Names of the backends registered in this process."""
    return sorted(_REGISTRY)
