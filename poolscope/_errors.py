"""poolscope's exceptions: one base class, and argument errors that are also TypeError/ValueError."""

from __future__ import annotations

import torch

__all__ = [
    "EscapeError",
    "PoolscopeError",
    "PoolscopeTypeError",
    "PoolscopeValueError",
    "PoolscopeWarning",
    "ScopeLimitError",
]


class PoolscopeError(RuntimeError):
    """Base class of every error poolscope raises, argument errors included."""


class PoolscopeTypeError(PoolscopeError, TypeError):
    """An argument of the wrong type; also a ``TypeError``."""


class PoolscopeValueError(PoolscopeError, ValueError):
    """An argument with a value poolscope cannot use; also a ``ValueError``."""


class EscapeError(PoolscopeError):
    """A ``strict=True`` scope exited while tensors it pooled were still alive."""


class ScopeLimitError(PoolscopeError, torch.OutOfMemoryError):
    """A ``pool_scope(max_bytes=..., on_limit="raise")`` refused an allocation.

    Inside the scope the refusal surfaces as ``torch.OutOfMemoryError``, as a
    full device would; the scope turns it into this error when it exits.
    """


class PoolscopeWarning(UserWarning):
    """Suspicious use: a scope that never routes anything, an engine that could not be built."""
