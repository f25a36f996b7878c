"""``pool_scope``: route large factory allocations of one thread into per-device pools.

Interception is a TorchDispatchMode rather than a TorchFunctionMode: a
function mode makes ``has_torch_function`` true, which silently switches
modules such as ``nn.TransformerEncoder`` off their fast path and changes
their output bits; a dispatch mode does not.

One mode serves all nested scopes of a thread, so decorated forwards nested
inside each other add no extra Python layer per op; the innermost scope on
the thread's stack decides how each allocation is routed.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import warnings
from typing import Any, Optional

import torch

from . import _config, _report
from ._config import (
    DEFAULT_THRESHOLD,
    ByteSize,
    DeviceLike,
    check_bool,
    check_name,
    parse_capture,
    parse_device,
    parse_threshold,
)
from ._errors import EscapeError, PoolscopeError, PoolscopeWarning
from ._factories import CAPTURED, Factory, plan
from ._faults import step
from ._outputs import output_layout, output_plan
from ._pool import Lease, Tally, TensorPool, get_pool
from ._snapshot import capture_frames
from ._stats import ScopeStats
from ._torch_compat import (
    TorchDispatchMode,
    dispatch_mode_stack,
    exit_dispatch_mode,
    infra_mode_active,
    profiler_enabled,
)

__all__ = ["PoolScope", "pool_scope"]

_state = threading.local()


def _scope_stack() -> list[PoolScope]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def current_scope() -> Optional[PoolScope]:
    """The innermost active scope of the calling thread, if any."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


class _PoolMode(TorchDispatchMode):
    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # Without this, torch.compile'd code called inside a scope silently runs
        # eagerly. With it, Dynamo compiles as usual (this mode is off while it
        # traces) and the compiled code runs with the mode on: ops that still go
        # through the dispatcher (eager and aot_eager backends) are pooled,
        # Inductor's own buffers are not.
        return True

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # PyTorch otherwise wraps __torch_dispatch__ in torch._disable_dynamo, which
        # imports torch._dynamo on the first op (about 1 s and 70 MiB of RSS) and adds
        # ~0.7 µs per op. Dynamo never traces this handler anyway: the mode is off while
        # Dynamo compiles (ignore_compile_internals), and compiled code calls it from C++.
        return False

    def __init__(self, stack: list[PoolScope]) -> None:
        super().__init__()
        self._stack = stack
        self._owner = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        stack = self._stack
        # Autograd copies the mode stack into its worker threads; a scope
        # routes only the thread that opened it.
        if stack and threading.get_ident() == self._owner:
            scope = stack[-1]
            spec = CAPTURED.get(func)
            if spec is not None:
                return scope._route_factory(func, spec, args, kwargs or {})
            if scope._capture_all:
                return scope._route_output(func, args, kwargs or {})
        return func(*args, **kwargs) if kwargs else func(*args)


class PoolScope(contextlib.ContextDecorator):
    """A context (and decorator) inside which large tensor allocations come from a pool.

    Create it with :func:`pool_scope`. ``stats`` reports what it routed.
    """

    def __init__(
        self,
        device: Optional[DeviceLike] = None,
        *,
        threshold: ByteSize = DEFAULT_THRESHOLD,
        capture: str = "factories",
        pool: Optional[TensorPool] = None,
        strict: bool = False,
        name: Optional[str] = None,
        enable_profiling: bool = False,
    ) -> None:
        self._device = None if device is None else parse_device(device)
        self._threshold = parse_threshold(threshold)
        self._capture = parse_capture(capture)
        self._capture_all = self._capture == "all"
        if pool is not None and not isinstance(pool, TensorPool):
            raise TypeError(
                f"pool must be a poolscope.TensorPool or None; got {pool!r} of type {type(pool).__name__}"
            )
        if pool is not None and self._device is not None and pool.device != self._device:
            raise ValueError(
                f"pool is on {pool.device} but device={str(self._device)!r}; pass one of them or make them agree"
            )
        self._pool = pool
        self._strict = check_bool(strict, "strict")
        self._name = check_name(name)
        self._profiling = check_bool(enable_profiling, "enable_profiling")
        self._active = False
        self._mode: Optional[_PoolMode] = None
        self._parent: Optional[PoolScope] = None
        self._profile_now = enable_profiling
        self._range: Any = None
        self._reset()

    def _reset(self) -> None:
        self._tally = Tally()
        self._pools: set[TensorPool] = set()
        self._routed = 0
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._escaped = 0
        self._escaped_leases: tuple[Lease, ...] = ()
        self._alloc_seconds = 0.0

    def _recreate_cm(self) -> PoolScope:
        # Each call of a decorated function gets a scope of its own.
        return PoolScope(
            self._device,
            threshold=self._threshold,
            capture=self._capture,
            pool=self._pool,
            strict=self._strict,
            name=self._name,
            enable_profiling=self._profiling,
        )

    @property
    def name(self) -> Optional[str]:
        return self._name

    @property
    def threshold(self) -> int:
        """Allocations needing at least this many bytes are pooled."""
        return self._threshold

    @property
    def device(self) -> Optional[torch.device]:
        """The only device this scope routes, or None for every device."""
        return self._pool.device if self._pool is not None else self._device

    @property
    def stats(self) -> ScopeStats:
        """This scope's figures: live while it is active, final after it exits."""
        return ScopeStats(
            name=self._name,
            allocations_routed=self._routed,
            bytes_routed=self._bytes,
            hits=self._hits,
            misses=self._misses,
            escaped=self._escaped if not self._active else len(self._tally.leases),
            peak_bytes_in_use=self._tally.peak_bytes,
            alloc_seconds=self._alloc_seconds,
        )

    def live_leases(self) -> list[Lease]:
        """The blocks this scope lent (nested scopes' escapes included) that are alive.

        While active: those alive now. After exit: those that escaped it.
        """
        return list(self._tally.leases.values()) if self._active else list(self._escaped_leases)

    def __repr__(self) -> str:
        device = "None" if self.device is None else repr(str(self.device))
        return (
            f"PoolScope(device={device}, threshold={self._threshold}, capture={self._capture!r}, "
            f"strict={self._strict}, name={self._name!r}, active={self._active})"
        )

    def __enter__(self) -> PoolScope:
        if self._active:
            raise PoolscopeError(f"{self!r} is already active; create a new pool_scope() for a nested scope")
        self._reset()
        step("scope.enter")
        if _config.DISABLED:
            self._active = True
            return self
        stack = _scope_stack()
        try:
            if profiler_enabled():
                self._range = torch.autograd.profiler.record_function(f"poolscope:{self._name or 'pool_scope'}")
                self._range.__enter__()
            step("scope.mode")
            if not stack or not _mode_installed(stack):
                mode = _PoolMode(stack)
                mode.__enter__()
                self._mode = mode
            self._parent = stack[-1] if stack else None
            # Profiling asked for by an enclosing scope covers nested ones too.
            self._profile_now = self._profiling or (self._parent is not None and self._parent._profile_now)
            step("scope.push")
            stack.append(self)
        except BaseException:
            self._unwind(stack)
            raise
        self._active = True
        return self

    def _unwind(self, stack: list[PoolScope]) -> None:
        """Leave nothing of this scope behind: off the scope stack, its mode and range exited."""
        if stack and stack[-1] is self:
            stack.pop()
        elif self in stack:
            stack.remove(self)
        mode, self._mode = self._mode, None
        rng, self._range = self._range, None
        self._active = False
        try:
            if mode is not None:
                exit_dispatch_mode(mode)
        finally:
            if rng is not None:
                rng.__exit__(None, None, None)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            step("scope.exit")
        finally:
            self._unwind(_scope_stack())
        step("scope.finish")
        self._finish()
        if self._name is not None and not _config.DISABLED:
            _report.record(self.stats, self._threshold)
        if self._strict and self._escaped and exc_type is None:
            raise EscapeError(
                f"pool_scope(strict=True{'' if self._name is None else f', name={self._name!r}'}) exited with "
                f"{self._escaped} pooled tensor(s) still alive; drop every reference to tensors created inside "
                "the scope before it ends (return copies with .clone() outside the scope), or use strict=False"
            )

    def _finish(self) -> None:
        for pool in self._pools:
            pool.trim()
        if self._strict and self._tally.leases:
            # Tensors held only by garbage cycles are not escapes.
            gc.collect()
            for pool in self._pools:
                pool.trim()
        self._escaped_leases = tuple(self._tally.leases.values())
        self._escaped = len(self._escaped_leases)
        parent, self._parent = self._parent, None
        if parent is not None and parent._active and self._escaped:
            # What escapes an inner scope lives on inside the outer one.
            parent._pools |= self._pools
            self._tally.hand_over(parent._tally)

    def _route_factory(self, func: Any, spec: Factory, args: tuple, kwargs: dict) -> Any:
        try:
            request = plan(spec, args, kwargs, self._threshold)
        except Exception:
            request = None
        out = None
        if request is not None and request.nbytes:
            out = self._lend(request.device, request.size, request.stride, request.dtype, request.nbytes)
        if out is None:
            return func(*args, **kwargs)
        if spec.fill is not None:
            try:
                spec.fill(out, args, kwargs)
            except Exception:
                # Let PyTorch run the call and raise its own error.
                del out
                return func(*args, **kwargs)
        return out

    def _route_output(self, func: Any, args: tuple, kwargs: dict) -> Any:
        plan_ = output_plan(func)
        found = output_layout(func, plan_, args, kwargs, self._threshold) if plan_ is not None else None
        out = None
        if found is not None:
            device, layout = found
            out = self._lend(device, layout.size, layout.stride, layout.dtype, layout.nbytes)
        if out is None or plan_ is None:
            return func(*args, **kwargs)
        try:
            plan_.out_op(*args, **kwargs, **{plan_.out_name: out})
        except Exception:
            del out
            return func(*args, **kwargs)
        return out

    def _lend(
        self, device: torch.device, size: tuple, stride: tuple, dtype: torch.dtype, nbytes: int
    ) -> Optional[torch.Tensor]:
        """A pooled tensor of this layout, or None when this scope must leave the call alone."""
        if (self._device is not None and device != self._device) or infra_mode_active():
            return None
        pool = self._pool
        if pool is None:
            pool = get_pool(device)
        elif pool.device != device:
            return None
        if pool not in self._pools:
            self._first_use(pool)
        frames = capture_frames(3) if self._profile_now else None
        start = time.perf_counter()
        lent = pool.lend(size, stride, dtype, nbytes, self._tally, frames)
        self._alloc_seconds += time.perf_counter() - start
        if lent is None:
            return None  # the pool could not grow: the ordinary allocator serves this one
        out, hit = lent
        self._routed += 1
        self._bytes += nbytes
        if hit:
            self._hits += 1
        else:
            self._misses += 1
        return out


    def _first_use(self, pool: TensorPool) -> None:
        self._pools.add(pool)
        cap = pool.max_cached_bytes
        if cap is not None and cap < self._threshold and not pool.warned_cap:
            pool.warned_cap = True
            warnings.warn(
                f"the {pool.device} pool caps its cache at max_cached_bytes={cap}, below this scope's "
                f"threshold={self._threshold}: no block it lends can be kept for reuse; raise the cap",
                PoolscopeWarning,
                stacklevel=5,
            )


def _mode_installed(stack: list[PoolScope]) -> bool:
    modes = dispatch_mode_stack()
    return any(scope._mode is not None and scope._mode in modes for scope in stack)


def pool_scope(
    device: Optional[DeviceLike] = None,
    *,
    threshold: ByteSize = DEFAULT_THRESHOLD,
    capture: str = "factories",
    pool: Optional[TensorPool] = None,
    strict: bool = False,
    name: Optional[str] = None,
    enable_profiling: bool = False,
) -> PoolScope:
    """Serve large tensor allocations of this thread from a pool, and give them back automatically.

    Inside the scope every factory call (``torch.empty``, ``zeros``, ``ones``,
    ``full``, ``rand``, ``randn``, ``randint``, ``empty_strided``, their
    ``*_like`` forms, ``Tensor.new_*``, ``arange``, ``eye``, ``linspace``)
    whose result needs at least ``threshold`` bytes gets its memory from the
    pool of its device. A block returns to the pool the moment the last
    reference to its memory dies (views, storages and tensors saved for
    backward count); it is never lent while referenced. Results are
    bit-identical to running without the scope.

    Example::

        with poolscope.pool_scope() as scope:
            out = model(x)
        print(scope.stats.allocations_routed, scope.stats.escaped)

        @poolscope.pool_scope(threshold="4MiB")
        def step(x): ...

    Args:
        device: route only allocations on this device; None routes every device.
        threshold: smallest allocation pooled, in bytes or as "1MiB", "512KB"
            (KB=1000, KiB=1024); default 1 MiB. Exactly-threshold requests are pooled.
        capture: "factories" (default) pools factory calls only; "all" also serves the
            output of every ATen op that has a fresh single-tensor output and an ``out=``
            overload (matmul, softmax, elementwise ops, cat, reductions, ...).
        pool: a :class:`TensorPool` to use instead of the device's shared pool.
        strict: raise :class:`EscapeError` at exit if pooled tensors are still alive.
        name: accumulate this scope's figures under this name in :func:`report`,
            and label it in torch.profiler traces.
        enable_profiling: record the Python stack of each pooled allocation and an
            alloc/free timeline for :func:`snapshot` (costly; off by default).

    Returns:
        A :class:`PoolScope`; ``with pool_scope() as s`` binds it, ``s.stats`` holds its figures.

    Raises:
        TypeError, ValueError: for a bad argument, naming it and what is allowed.

    Limits:
        The scope belongs to the thread that entered it. Meta and fake tensors,
        ``out=`` calls, non-strided layouts and pinned memory are never pooled.
        A pooled tensor's storage cannot be grown with ``resize_``.
    """
    return PoolScope(
        device,
        threshold=threshold,
        capture=capture,
        pool=pool,
        strict=strict,
        name=name,
        enable_profiling=enable_profiling,
    )
