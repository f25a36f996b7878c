"""The engine boundary: what an engine provides, and the options every engine reads.

An engine makes *pool backends* (memory caches of one device) and *scope backends* (one
activation of a scope on one thread, routing that thread's large allocations into a pool).
Everything above the ``engines`` package (scopes, decorators, reports, snapshots, the test
kit) talks to these protocols only, and every engine answers with poolscope's own figure
dataclasses (:mod:`poolscope._stats`), so a figure has one name everywhere.

This module imports no engine: the engines import it, and ``engines/__init__.py`` chooses
among them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch

from .._stats import LimitRefusal, PoolStats, ScopeStats

__all__ = [
    "Engine",
    "PoolBackend",
    "PoolLimits",
    "PythonPushPop",
    "ScopeBackend",
    "ScopeOptions",
    "ScopeSlot",
]


@dataclass(frozen=True)
class PoolLimits:
    """A pool's validated settings; ``None`` means no limit (or, for ``release_idle_s``, never).

    ``learn_after`` and ``learn_idle``: that clock starts at its setting and learns from the
    traffic (the native engine; others keep the setting).
    """

    max_cached_bytes: Optional[int] = None
    max_bytes: Optional[int] = None
    release_after: int = 100
    release_idle_s: Optional[float] = None
    learn_after: bool = False
    learn_idle: bool = False


@dataclass(frozen=True)
class ScopeOptions:
    """A scope's validated settings, built by keyword in ``_config.scope_options``.

    ``pool_scope``, ``pooled_forward``, ``testing.assert_no_leaks`` and the hand-written pool
    compatibility layer all make one; decorators reuse it for every call. ``pool`` is a
    ``TensorPool`` (typed loosely so that this layer does not import the one above it).
    ``counts_exits`` is False for poolscope's own scopes: their exits do not advance the
    pools' retention window.
    """

    threshold: int
    max_bytes: Optional[int] = None
    on_limit: str = "raise"
    strict: bool = False
    name: Optional[str] = None
    profiling: bool = False
    counts_exits: bool = True
    device: Optional[torch.device] = None
    pool: Optional[Any] = None

    @property
    def fallback(self) -> bool:
        """Past ``max_bytes``, let the ordinary allocator serve the request instead of refusing it."""
        return self.on_limit == "fallback"


class ScopeSlot:
    """Where a scope keeps its backend between the push and the pop.

    ``Engine.exit_then`` reads ``slot.backend``: a slot attribute, so a native engine reads
    it without running a Python frame.
    """

    __slots__ = ("backend",)

    def __init__(self) -> None:
        self.backend: Optional[ScopeBackend] = None


class PoolBackend(Protocol):
    """A cache of one device's memory."""

    def configure(self, limits: PoolLimits) -> None: ...

    def stats(self) -> PoolStats: ...

    def release(self, everything: bool) -> None: ...  # everything, or what no recent exit reused

    def segments(self) -> list[dict[str, Any]]: ...

    def trace(self) -> list[dict[str, Any]]: ...


class ScopeBackend(Protocol):
    """One activation of a scope on the thread that enters it."""

    def enter(self) -> None: ...

    def exit(self) -> str: ...  # "ok" (from any thread: another thread's exit closes it) or "not_active"

    def stats(self) -> ScopeStats: ...  # ``escaped`` counts the blocks alive now

    def reset_peak(self) -> None: ...

    def live_blocks(self) -> list[dict[str, Any]]: ...

    def refusal(self) -> Optional[LimitRefusal]: ...  # its last allocation refused past a max_bytes


class Engine(Protocol):
    """Makes pools and scopes, and pushes and pops scopes for the with-statement.

    ``enter_then(prepare, result)`` calls ``prepare()`` (Python; returns a scope backend),
    pushes that backend on the calling thread's stack and returns ``result``;
    ``exit_then(slot, after, *exc)`` pops ``slot.backend`` and returns ``after(outcome, *exc)``.
    Native engines implement both in C, so that no Python frame (where a pending signal could
    raise) runs between the with-statement and the push or pop.
    """

    name: str

    @property
    def enter_then(self) -> Callable[..., Any]: ...

    @property
    def exit_then(self) -> Callable[..., Any]: ...

    def new_pool(self, device: torch.device, limits: PoolLimits) -> PoolBackend: ...

    def new_scope(self, pool: PoolBackend, options: ScopeOptions) -> ScopeBackend: ...


def _python_enter_then(prepare: Callable[[], ScopeBackend], result: Any) -> Any:
    prepare().enter()
    return result


def _python_exit_then(slot: ScopeSlot, after: Callable[..., Any], *exc: Any) -> Any:
    backend = slot.backend
    return after(backend.exit() if backend is not None else "not_active", *exc)


class PythonPushPop:
    """``enter_then``/``exit_then`` for engines whose push and pop are Python anyway."""

    @property
    def enter_then(self) -> Callable[..., Any]:
        return _python_enter_then

    @property
    def exit_then(self) -> Callable[..., Any]:
        return _python_exit_then
