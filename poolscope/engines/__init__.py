"""Engines, and which one serves which device (chosen, and built if needed, on first use).

- ``native`` (CPU): a C++ ``c10::Allocator`` installed in place of PyTorch's CPU allocator on
  first use; ``native.py``, its build and loader ``build.py``, and ``csrc/``.
- ``mempool`` (CUDA): PyTorch's ``torch.cuda.MemPool`` with its C++ thread routing; ``mempool.py``.
- ``passthrough``: scopes that route nothing, for devices without a route, for machines where
  the native engine cannot be built, and POOLSCOPE_ENGINE=passthrough; ``passthrough.py``.

The protocols they implement, and the options they read, are in ``base.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._config import ENV, DeviceLike, parse_device
from .._diagnostics import warn_at_caller
from .._errors import PoolscopeError
from .._forksafe import ForkSafeLock
from .base import Engine

__all__ = ["engine", "engine_for"]

_lock = ForkSafeLock()
_cpu_engine: Optional[Engine] = None
_cuda_engine: Optional[Engine] = None


def _pick_cpu_engine() -> Engine:
    from . import passthrough

    if ENV.disabled or ENV.engine == "passthrough":
        return passthrough.ENGINE
    from .build import BuildError
    from .native import NativeEngine

    try:
        return NativeEngine()
    except BuildError as exc:
        if ENV.engine == "native":
            raise PoolscopeError(f"POOLSCOPE_ENGINE=native, but the native engine is unavailable: {exc}") from exc
        warn_at_caller(
            f"poolscope's native engine is unavailable, so scopes will pool nothing (results are unchanged): {exc}"
        )
        return passthrough.ENGINE


def _pick_cuda_engine() -> Engine:
    from .._torch_compat import CudaAllocatorAPI
    from . import passthrough

    if ENV.disabled or ENV.engine == "passthrough" or not CudaAllocatorAPI.available():
        return passthrough.ENGINE
    from .mempool import CudaEngine

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
        from . import passthrough

        return passthrough.ENGINE
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
