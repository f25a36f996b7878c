"""The engine boundary: what an engine provides, and which engine serves which device.

An engine makes *pool backends* (memory caches of one device) and *scope
backends* (one activation of a scope on one thread, routing that thread's
large allocations into a pool). Everything above this module (scopes,
decorators, reports, snapshots, the test kit) talks to these two protocols
only. Engines:

- ``native`` (CPU): a C++ ``c10::Allocator`` installed in place of PyTorch's
  CPU allocator on first use; see ``_native.py`` and ``csrc/``.
- ``mempool`` (CUDA): PyTorch's ``torch.cuda.MemPool`` with its C++ thread routing; see ``_cuda.py``.
- ``passthrough``: scopes that route nothing, for devices without a route, for
  machines where the native engine cannot be built, and POOLSCOPE_ENGINE=passthrough.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Protocol

import torch

from ._config import ENV, DeviceLike, parse_device
from ._errors import PoolscopeError

__all__ = ["Engine", "PoolBackend", "ScopeBackend", "engine", "engine_for"]

NO_LIMIT = -1


class PoolBackend(Protocol):
    """A cache of one device's memory. Limits are byte counts, ``NO_LIMIT`` for none."""

    def configure(self, max_cached: int, max_bytes: int, release_after: int, release_idle_us: int) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def release(self, everything: bool) -> None: ...

    def segments(self) -> list[dict[str, Any]]: ...

    def trace(self) -> list[dict[str, Any]]: ...


class ScopeBackend(Protocol):
    """One activation of a scope on the thread that enters it."""

    def enter(self) -> None: ...

    def exit(self) -> str: ...  # "ok", "wrong_thread" or "not_active"

    def stats(self) -> dict[str, Any]: ...

    def reset_peak(self) -> None: ...

    def live_blocks(self) -> list[dict[str, Any]]: ...

    def limit_error(self) -> Optional[tuple[str, list[dict[str, Any]]]]: ...


class Engine(Protocol):
    """Makes pools and scopes, and pushes and pops scopes for the with-statement.

    ``enter_then(prepare, result)`` calls ``prepare()`` (Python; returns a scope
    backend), pushes that backend on the calling thread's stack and returns
    ``result``; ``exit_then(scope, after, *exc)`` pops ``scope._backend`` and returns
    ``after(outcome, *exc)``. Native engines implement both in C, so that no
    Python frame (where a pending signal could raise) runs between the
    with-statement and the push or pop.
    """

    name: str

    @property
    def enter_then(self) -> Callable[..., Any]: ...

    @property
    def exit_then(self) -> Callable[..., Any]: ...

    def new_pool(
        self, device: torch.device, max_cached: int, max_bytes: int, release_after: int, release_idle_us: int
    ) -> PoolBackend: ...

    def new_scope(
        self,
        pool: PoolBackend,
        threshold: int,
        max_bytes: int,
        fallback: bool,
        profiling: bool,
        name: str,
        ticks: bool,
    ) -> ScopeBackend: ...


def python_enter_then(prepare: Callable[[], ScopeBackend], result: Any) -> Any:
    """``Engine.enter_then`` for engines whose push is Python anyway (nothing of theirs can be left open)."""
    prepare().enter()
    return result


def python_exit_then(scope: Any, after: Callable[..., Any], *exc: Any) -> Any:
    backend = scope._backend
    return after(backend.exit() if backend is not None else "not_active", *exc)


class PythonPushPop:
    """``enter_then``/``exit_then`` for engines whose push and pop are Python anyway."""

    @property
    def enter_then(self) -> Callable[..., Any]:
        return python_enter_then

    @property
    def exit_then(self) -> Callable[..., Any]:
        return python_exit_then


_lock = threading.Lock()
_cpu_engine: Optional[Engine] = None
_cuda_engine: Optional[Engine] = None


def _pick_cpu_engine() -> Engine:
    from . import _passthrough

    if ENV.disabled or ENV.engine == "passthrough":
        return _passthrough.ENGINE
    from . import _native
    from ._build import BuildError
    from ._report import warn_at_caller

    try:
        return _native.NativeEngine()
    except BuildError as exc:
        if ENV.engine == "native":
            raise PoolscopeError(f"POOLSCOPE_ENGINE=native, but the native engine is unavailable: {exc}") from exc
        warn_at_caller(
            f"poolscope's native engine is unavailable, so scopes will pool nothing (results are unchanged): {exc}"
        )
        return _passthrough.ENGINE


def _pick_cuda_engine() -> Engine:
    from . import _passthrough
    from ._torch_compat import CudaAllocatorAPI

    if ENV.disabled or ENV.engine == "passthrough" or not CudaAllocatorAPI.available():
        return _passthrough.ENGINE
    from ._cuda import CudaEngine

    return CudaEngine(CudaAllocatorAPI())


def engine_for(device: torch.device) -> Engine:
    """The engine that serves ``device`` (chosen, and built if needed, on first use)."""
    global _cpu_engine, _cuda_engine
    if device.type == "cuda":
        if _cuda_engine is None:
            with _lock:
                if _cuda_engine is None:
                    _cuda_engine = _pick_cuda_engine()
        return _cuda_engine
    if device.type != "cpu":
        from . import _passthrough

        return _passthrough.ENGINE
    if _cpu_engine is None:
        with _lock:
            if _cpu_engine is None:
                _cpu_engine = _pick_cpu_engine()
    return _cpu_engine


def engine(device: DeviceLike = "cpu") -> str:
    """Name the engine that serves ``device``: ``"native"`` (CPU), ``"mempool"`` (CUDA) or ``"passthrough"``.

    Example::

        >>> poolscope.engine()
        'native'

    The first call chooses the engine (``POOLSCOPE_ENGINE`` decides; unset means
    native, or passthrough with one warning where it cannot be built) and builds
    the native engine if this torch has no build yet.

    Raises:
        PoolscopeTypeError, PoolscopeValueError: for a bad device.
        PoolscopeError: under POOLSCOPE_ENGINE=native when the native engine cannot be built.
    """
    return engine_for(parse_device(device)).name
