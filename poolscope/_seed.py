"""The seed's global-pool interface, kept so that hand-written integrations keep working.

The seed template calls ``get_global_memory_pool(...)``, ``allocate(shape,
dtype, device)`` and ``deallocate(tensor)``. Here ``allocate`` lends a pooled
block whose memory comes back by itself when the tensor dies, so
``deallocate`` is only a hint: it can never free memory that is still
referenced, and calling it twice is harmless.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Optional, Union

import torch

from ._config import DeviceLike, check_bool, parse_device
from ._pool import contiguous_strides, get_pool
from ._snapshot import capture_frames
from ._stats import PoolStats

__all__ = ["GlobalMemoryPool", "get_global_memory_pool"]

Shape = Union[int, Sequence[int]]


class GlobalMemoryPool:
    """Seed-compatible facade over the per-device pools. Get it with :func:`get_global_memory_pool`."""

    def __init__(self, enable_profiling: bool = False) -> None:
        self.enable_profiling = check_bool(enable_profiling, "enable_profiling")

    def allocate(
        self,
        shape: Shape,
        dtype: torch.dtype = torch.float32,
        device: DeviceLike = "cpu",
        zero_init: bool = True,
    ) -> torch.Tensor:
        """Return a contiguous tensor whose memory comes from the device's pool.

        Example::

            pool = poolscope.get_global_memory_pool()
            scratch = pool.allocate((4096, 1024), torch.float16, "cpu")

        Args:
            shape: an int or a sequence of non-negative ints.
            dtype: any torch dtype (int and bool included).
            device: where to allocate.
            zero_init: fill with zeros (the seed's default) instead of leaving it uninitialised.

        Raises:
            TypeError, ValueError: for a bad shape, dtype or device.
        """
        size = _parse_shape(shape)
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype such as torch.float32; got {dtype!r}")
        dev = parse_device(device)
        check_bool(zero_init, "zero_init")
        nbytes = math.prod(size) * dtype.itemsize
        if nbytes == 0:
            return torch.empty(size, dtype=dtype, device=dev)
        frames = capture_frames(2) if self.enable_profiling else None
        lent = get_pool(dev).lend(size, contiguous_strides(size), dtype, nbytes, frames=frames)
        tensor = torch.empty(size, dtype=dtype, device=dev) if lent is None else lent[0]
        if zero_init:
            tensor.zero_()
        return tensor

    def deallocate(self, tensor: torch.Tensor) -> None:
        """Accept the seed's explicit release as a hint.

        The block returns to the pool when the last reference to its memory
        dies, never earlier; drop your references (``del tensor``) to let it go.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"deallocate takes a torch.Tensor; got {tensor!r} of type {type(tensor).__name__}")

    def stats(self, device: DeviceLike = "cpu") -> PoolStats:
        """The figures of ``device``'s pool."""
        return get_pool(device).stats()


def _parse_shape(shape: object) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
    if not isinstance(dims, Sequence) or isinstance(dims, str):
        raise TypeError(f"shape must be an int or a sequence of ints such as (4, 1024); got {shape!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"shape must contain ints; got {shape!r}")
        if d < 0:
            raise ValueError(f"shape must not contain negative sizes; got {shape!r}")
    return tuple(dims)


_instance: Optional[GlobalMemoryPool] = None
_instance_lock = threading.Lock()


def get_global_memory_pool(enable_profiling: bool = False) -> GlobalMemoryPool:
    """Return the process-wide seed-compatible pool (created on first call).

    Example::

        from poolscope import get_global_memory_pool
        pool = get_global_memory_pool(enable_profiling=False)

    Args:
        enable_profiling: the seed's switch: record where each block was allocated, for
            :func:`snapshot`. Once any caller turns it on it stays on.

    Raises:
        TypeError: when ``enable_profiling`` is not a bool.
    """
    global _instance
    check_bool(enable_profiling, "enable_profiling")
    with _instance_lock:
        if _instance is None:
            _instance = GlobalMemoryPool(enable_profiling)
        elif enable_profiling:
            _instance.enable_profiling = True
        return _instance
