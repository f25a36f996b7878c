"""Hand-written global pool compatibility: its interface, so that integrations written against it keep working.

Before poolscope, long-sequence attention code (a dilated-attention project whose
integration guide users wrote by hand) threaded a global pool
through its modules: ``get_global_memory_pool(...)``, then
``allocate(shape, dtype, device, strategy)`` and ``deallocate(tensor)``. Here
``allocate`` serves the tensor from the device's pool and its memory comes
back by itself when the tensor dies, so ``deallocate`` is only a hint: it can
never free memory that is still referenced, and calling it twice is harmless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from ._config import DeviceLike, check_bool, parse_choice, parse_device
from ._errors import PoolscopeTypeError, PoolscopeValueError
from ._forksafe import ForkSafeLock
from ._pool import get_pool
from ._options import scope_options
from ._scope import PoolScope
from ._stats import PoolStats

__all__ = ["GlobalMemoryPool", "get_global_memory_pool"]

Shape = Union[int, Sequence[int]]
# The hand-written pool's strategies; poolscope picks blocks itself, so all but
# "fallback" (plain PyTorch allocation) mean the same.
STRATEGIES = ("auto", "bucketed", "fragment_aware", "numa_aware", "fallback")


class GlobalMemoryPool:
    """Facade over the per-device pools with the hand-written pool's API. Get it with :func:`get_global_memory_pool`."""

    def __init__(self, enable_profiling: bool = False) -> None:
        self.enable_profiling = check_bool(enable_profiling, "enable_profiling")

    def allocate(
        self,
        shape: Shape,
        dtype: torch.dtype = torch.float32,
        device: Optional[DeviceLike] = None,
        strategy: str = "auto",
        *,
        zero_init: bool = True,
    ) -> torch.Tensor:
        """Return a contiguous tensor whose memory comes from the device's pool.

        Example::

            pool = poolscope.get_global_memory_pool()
            scratch = pool.allocate((4096, 1024), torch.float16, "cpu")

        Args:
            shape: an int or a sequence of non-negative ints.
            dtype: any torch dtype (int and bool included).
            device: where to allocate; None means CUDA when available, else CPU
                (as the hand-written pool did).
            strategy: accepted for compatibility: "auto", "bucketed", "fragment_aware" and
                "numa_aware" all use the pool; "fallback" allocates outside it.
            zero_init: fill with zeros instead of leaving the memory uninitialised.

        Raises:
            PoolscopeTypeError, PoolscopeValueError: for a bad shape, dtype, device or strategy.
        """
        size = _parse_shape(shape)
        if not isinstance(dtype, torch.dtype):
            raise PoolscopeTypeError(f"dtype must be a torch.dtype such as torch.float32; got {dtype!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = parse_device(device)
        if isinstance(strategy, bool):
            raise PoolscopeTypeError(
                f"strategy must be one of {STRATEGIES}; got {strategy!r} of type bool (pass zero_init= by keyword)"
            )
        check_bool(zero_init, "zero_init")
        if parse_choice(strategy, "strategy", STRATEGIES) == "fallback":
            tensor = torch.empty(size, dtype=dtype, device=dev)
        else:
            options = scope_options(threshold=1, pool=get_pool(dev), enable_profiling=self.enable_profiling,
                                    counts_exits=False)
            with PoolScope(options):
                tensor = torch.empty(size, dtype=dtype, device=dev)
        if zero_init:
            tensor.zero_()
        return tensor

    def deallocate(self, tensor: torch.Tensor) -> None:
        """Accept an explicit release as a hint.

        The block returns to the pool when the last reference to its memory
        dies, never earlier; drop your references (``del tensor``) to let it go.
        """
        if not isinstance(tensor, torch.Tensor):
            raise PoolscopeTypeError(f"deallocate takes a torch.Tensor; got {tensor!r} of type {type(tensor).__name__}")

    def stats(self, device: DeviceLike = "cpu") -> PoolStats:
        """The figures of ``device``'s pool."""
        return get_pool(device).stats()


def _parse_shape(shape: object) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
    if not isinstance(dims, Sequence) or isinstance(dims, str):
        raise PoolscopeTypeError(f"shape must be an int or a sequence of ints such as (4, 1024); got {shape!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise PoolscopeTypeError(f"shape must contain ints; got {shape!r}")
        if d < 0:
            raise PoolscopeValueError(f"shape must not contain negative sizes; got {shape!r}")
    return tuple(dims)


_instance: Optional[GlobalMemoryPool] = None
_instance_lock = ForkSafeLock()


def get_global_memory_pool(enable_profiling: bool = False) -> GlobalMemoryPool:
    """Return the process-wide pool with the hand-written global pool's API (created on first call).

    Example::

        from poolscope import get_global_memory_pool
        pool = get_global_memory_pool(enable_profiling=False)

    Args:
        enable_profiling: record where each block was allocated, for
            :func:`snapshot`. Once any caller turns it on it stays on.

    Raises:
        PoolscopeTypeError: when ``enable_profiling`` is not a bool.
    """
    global _instance
    check_bool(enable_profiling, "enable_profiling")
    with _instance_lock:
        if _instance is None:
            _instance = GlobalMemoryPool(enable_profiling)
        elif enable_profiling:
            _instance.enable_profiling = True
        return _instance
