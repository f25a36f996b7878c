"""``pool_scope``: serve a thread's large allocations from a pool, and return them to it automatically.

A scope belongs to the thread that enters it, as ``torch.no_grad`` does:
entering pushes it on that thread's stack of open scopes (kept in C++ by the
native engine, where the allocator reads it) and the innermost one decides
how an allocation is routed. Exits may come out of order (a generator's scope
closed inside its caller's): the scope leaves the stack and the others stay
open. An exit from another thread (a generator finalized there) closes the
scope: its figures are final, and its own thread stops routing to it before
its next pooled allocation.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import re
from typing import Any, Callable, Optional

import torch

from . import _report
from ._config import DEFAULT_THRESHOLD, ByteSize, DeviceLike
from ._diagnostics import clean_blocks, limit_report, log, log_pool_changes, warn_at_caller
from ._errors import EscapeError, PoolscopeError, ScopeLimitError
from ._options import scope_options
from ._pool import TensorPool, get_pool
from ._stats import PoolStats, ScopeStats
from ._torch_compat import profiler_enabled
from .engines.base import ScopeBackend, ScopeOptions, ScopeSlot

__all__ = ["PoolScope", "pool_scope"]

_REFUSAL = re.compile(r"\[poolscope refusal #(\d+)\]")


class _AsyncSafe:
    """A special method whose bound form is a C-level callable made by ``make(instance)``.

    The with-statement looks ``__enter__``/``__exit__`` up (running ``make``, in
    Python) before it enters, and later calls what it got. A Python method would
    run a frame whose start handles pending signals, before the first line; a
    ``functools.partial`` of the engine's native ``enter_then``/``exit_then`` runs
    none between the call and the push or pop.
    """

    def __init__(self, make: Callable[[Any], Callable[..., Any]]) -> None:
        self._make = make

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return self if instance is None else self._make(instance)

    def __call__(self, instance: Any, *args: Any) -> Any:  # type(cm).__exit__(cm, ...), as ExitStack does
        return self._make(instance)(*args)


class PoolScope(contextlib.ContextDecorator):
    """A context (and decorator) inside which large allocations of this thread come from a pool.

    Create it with :func:`pool_scope`. ``stats`` reports what it routed.
    """

    # The with-statement calls these without a Python frame between it and the
    # engine's push and pop (see _AsyncSafe), so that an asynchronous exception
    # (KeyboardInterrupt, a signal handler's) cannot leave a scope open.
    __enter__ = _AsyncSafe(lambda self: functools.partial(self._pool()._engine.enter_then, self._prepare, self))
    __exit__ = _AsyncSafe(lambda self: functools.partial(self._pool()._engine.exit_then, self._slot, self._after_exit))

    def __init__(self, options: ScopeOptions) -> None:
        self._options = options
        self._slot = ScopeSlot()
        self._active = False
        self._final: Optional[ScopeStats] = None
        self._range: Any = None
        self._logged_from: Optional[PoolStats] = None

    def _recreate_cm(self) -> PoolScope:
        # Each call of a decorated function gets a scope of its own.
        return PoolScope(self._options)

    @property
    def _backend(self) -> Optional[ScopeBackend]:
        return self._slot.backend

    @property
    def name(self) -> Optional[str]:
        return self._options.name

    @property
    def threshold(self) -> int:
        """Allocations of at least this many bytes are pooled."""
        return self._options.threshold

    @property
    def max_bytes(self) -> Optional[int]:
        """The most pooled bytes alive at once on this scope's behalf; None for no limit."""
        return self._options.max_bytes

    @property
    def device(self) -> torch.device:
        """The device this scope routes."""
        s = self._options
        return s.pool.device if s.pool is not None else (s.device or torch.device("cpu"))

    @property
    def active(self) -> bool:
        return self._active

    @property
    def stats(self) -> ScopeStats:
        """This scope's figures: live while it is active, final after it exits."""
        if self._final is not None:
            return self._final
        backend = self._backend
        return ScopeStats(name=self.name) if backend is None else backend.stats()

    def reset_peak(self) -> None:
        """Restart ``stats.peak_bytes_in_use`` from the bytes alive now (while active)."""
        if self._backend is not None and self._active:
            self._backend.reset_peak()

    def live_blocks(self) -> list[dict[str, Any]]:
        """The pooled blocks lent on this scope's behalf that are still alive.

        Each is a dict with ``address``, ``size``, ``requested_size`` and
        ``frames`` (where it was allocated, innermost first; empty unless profiling).
        """
        return [] if self._backend is None else clean_blocks(self._backend.live_blocks())

    def __repr__(self) -> str:
        s = self._options
        return (
            f"PoolScope(device={str(self.device)!r}, threshold={s.threshold}, max_bytes={s.max_bytes}, "
            f"on_limit={s.on_limit!r}, strict={s.strict}, name={s.name!r}, active={self._active})"
        )

    def _pool(self) -> TensorPool:
        s = self._options
        return s.pool if s.pool is not None else get_pool(self.device)

    def _prepare(self) -> ScopeBackend:
        """Everything of entering but the push: runs before it, in Python."""
        if self._active:
            raise PoolscopeError(f"{self!r} is already active; create a new pool_scope() for a nested scope")
        s = self._options
        pool = self._pool()
        backend = pool._engine.new_scope(pool._backend, s)
        if pool.max_cached_bytes is not None and pool.max_cached_bytes < s.threshold and not pool._warned_cap:
            pool._warned_cap = True
            warn_at_caller(
                f"the {pool.device} pool caps its cache at max_cached_bytes={pool.max_cached_bytes}, below this "
                f"scope's threshold={s.threshold}: no block it lends can be kept for reuse; raise the cap"
            )
        self._logged_from = pool.stats() if log.isEnabledFor(logging.DEBUG) else None
        if profiler_enabled():
            self._range = torch.autograd.profiler.record_function(f"poolscope:{s.name or 'pool_scope'}")
            self._range.__enter__()
        self._slot.backend, self._final = backend, None
        self._active = True
        return backend

    def _after_exit(self, outcome: str, exc_type: Any, exc: Any, tb: Any) -> None:
        """Everything of exiting but the pop: runs after it, in Python."""
        if outcome == "not_active":
            raise PoolscopeError(f"{self!r} is not active: it was never entered or has already exited")
        self._active = False
        rng, self._range = self._range, None
        if rng is not None:
            rng.__exit__(None, None, None)
        self._finish()
        if self._logged_from is not None:
            log_pool_changes(self._logged_from, self._pool().stats())
        assert self._backend is not None and self._final is not None
        if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError) and not isinstance(exc, ScopeLimitError):
            refusal = self._backend.refusal()
            serial = _REFUSAL.search(str(exc))
            if refusal is not None and serial is not None and int(serial.group(1)) == refusal.serial:
                raise ScopeLimitError(limit_report(refusal.message, clean_blocks(refusal.blocks))) from exc
        if self._options.strict and self._final.escaped and exc_type is None:
            raise EscapeError(
                f"pool_scope(strict=True{'' if self.name is None else f', name={self.name!r}'}) exited with "
                f"{self._final.escaped} pooled tensor(s) still alive; drop every reference to tensors created "
                "inside the scope before it ends (return copies with .clone() made outside the scope), or use "
                "strict=False"
            )

    def _finish(self) -> None:
        assert self._backend is not None
        if self._options.strict and self._backend.stats().escaped:
            gc.collect()  # tensors held only by garbage cycles are not escapes
        self._final = self._backend.stats()
        if self.name is not None or self._options.counts_exits:  # poolscope's own scopes stay out
            _report.record(self._final, self._options.threshold, self._backend)


def pool_scope(
    device: Optional[DeviceLike] = None,
    *,
    threshold: ByteSize = DEFAULT_THRESHOLD,
    capture: str = "all",
    pool: Optional[TensorPool] = None,
    max_bytes: Optional[ByteSize] = None,
    on_limit: str = "raise",
    strict: bool = False,
    name: Optional[str] = None,
    enable_profiling: bool = False,
) -> PoolScope:
    """Serve this thread's large allocations from a pool, and return them to it automatically.

    Inside the scope every CPU allocation of at least ``threshold`` bytes that
    this thread makes (factories, op outputs, multi-output and fused kernels,
    backward run in this thread, compiled code's buffers) gets its memory from
    the device's pool. A block returns the moment the last reference to its
    memory dies (views, storages and tensors saved for backward count) and is
    never lent while referenced. The same kernels run, so results are
    bit-identical to running without the scope.

    Example::

        with poolscope.pool_scope() as scope:
            out = model(x)
        print(scope.stats.allocations_routed, scope.stats.peak_bytes_in_use)

        @poolscope.pool_scope(threshold="4MiB", max_bytes="2GiB")
        def step(x): ...

    Args:
        device: the device to route ("cpu", the default). A device without a
            route ("mps"), or one this machine lacks ("cuda" without CUDA), gets a
            scope that passes everything through.
        threshold: smallest allocation pooled, in bytes or as "1MiB", "512KB"
            (KB=1000, KiB=1024); default 1 MiB. Exactly-threshold requests are pooled.
        capture: "all" (the default). "factories" is deprecated and means the same.
        pool: a :class:`TensorPool` to use instead of the device's shared pool.
        max_bytes: the most pooled bytes alive at once on this scope's behalf
            (nested scopes count toward it); None for no limit.
        on_limit: past ``max_bytes``: "raise" (the default; ``torch.OutOfMemoryError``
            inside the scope, :class:`ScopeLimitError` once it propagates out of it)
            or "fallback" (PyTorch's ordinary allocator serves it, counted in
            ``stats.fallbacks``).
        strict: raise :class:`EscapeError` at exit if pooled tensors are still alive.
        name: accumulate this scope's figures under this name in :func:`report`,
            and label it in torch.profiler traces.
        enable_profiling: record where each pooled allocation was made (Python
            stack) for leak reports, limit errors and :func:`snapshot`; costs a
            stack capture per pooled allocation.

    Returns:
        A :class:`PoolScope`; ``with pool_scope() as s`` binds it, ``s.stats`` holds its figures.

    Raises:
        PoolscopeTypeError, PoolscopeValueError: for a bad argument, naming it and
            what is allowed (they are also TypeError and ValueError).

    Limits:
        The scope belongs to the thread that entered it: other threads' allocations
        (intra-op worker threads included) are left alone, and a generator paused
        (or an ``asyncio`` task suspended) inside a scope leaves it routing whatever
        else runs on that thread, its caller included, as ``torch.no_grad`` would.
        An exit from another thread closes the scope. Pinned memory is never pooled.
    """
    return PoolScope(scope_options(
        device=device, threshold=threshold, capture=capture, pool=pool, max_bytes=max_bytes, on_limit=on_limit,
        strict=strict, name=name, enable_profiling=enable_profiling,
    ))
