"""poolscope's exceptions. Bad arguments raise TypeError or ValueError instead."""

from __future__ import annotations


class PoolscopeError(RuntimeError):
    """Base class of every error poolscope raises on its own account."""


class EscapeError(PoolscopeError):
    """A ``strict=True`` scope exited while tensors it pooled were still alive."""


class PoolscopeWarning(UserWarning):
    """Suspicious use: a scope that never routes anything, a cap below the threshold."""
