"""Per-device pools: ``TensorPool``, the shared pools of ``get_pool``, and ``release_unused``."""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch

from ._config import (
    ENV,
    ByteSize,
    DeviceLike,
    ReleaseAfter,
    ReleaseIdle,
    parse_device,
    parse_limit,
    parse_release_after,
    parse_release_idle,
)
from ._diagnostics import clean_blocks
from ._forksafe import ForkSafeLock
from ._stats import PoolStats
from .engines import engine_for
from .engines.base import Engine, PoolBackend, PoolLimits

__all__ = ["TensorPool", "all_pools", "get_pool", "release_unused"]

_lock = ForkSafeLock()
_SHARED: dict[torch.device, TensorPool] = {}
_ALL: weakref.WeakSet[TensorPool] = weakref.WeakSet()


class TensorPool:
    """A cache of memory blocks on one device, lent to the large tensors that scopes route to it.

    A block is freed into the pool the moment the last reference to its memory
    dies; there is no deallocate. Cached memory is released to the system when
    no allocation reused it during the last ``release_after`` outermost-scope
    exits, or when nothing used it for ``release_idle_s`` seconds, whichever
    comes first: the second needs no call and no scope exit (a background
    thread does it). Left at "auto", both clocks learn the traffic's pauses:
    memory the traffic faulted in again after a release is held longer next
    time, up to 32x the built-in 100 exits and 10 s (docs/memory.md). When
    the system or the process's cgroup runs low on memory, every cached block
    goes back at once.

    Example::

        pool = poolscope.TensorPool("cpu", max_cached_bytes="512MiB")
        with poolscope.pool_scope(pool=pool):
            y = model(x)
        print(pool.stats().hits)
        pool.empty_cache()

    Args:
        device: the device whose memory this pool holds.
        max_cached_bytes: cap on idle cached bytes (int or "512MiB"); None for no cap.
        max_bytes: hard limit on bytes in use plus cached, like CuPy's ``set_limit``;
            None for none. Past it the pool releases its cache and tries again,
            then lets PyTorch's ordinary allocator serve the request (``fallbacks``).
        release_after: cached memory that no allocation reused during this many
            outermost-scope exits is released; 0 releases every cached block at each
            outermost exit. "auto" (the default, or POOLSCOPE_RELEASE_AFTER) starts at
            100 and learns, up to 3,200; an int is exactly that, never learned.
        release_idle_s: seconds after which cached memory nothing used is released by
            itself; None, 0, ``math.inf`` and anything from 2**62 microseconds on turn
            it off. "auto" (the default, or POOLSCOPE_RELEASE_IDLE_S) starts at 10 s and
            learns, up to 320 s; a number is exactly that, never learned.

    Raises:
        PoolscopeTypeError, PoolscopeValueError: for a bad device, a NaN or negative
            duration, or a byte size or count that is negative or past 2**63 - 1.

    Limits:
        CPU pools are the native engine's; CUDA pools are ``torch.cuda.MemPool``s
        (the ``mempool`` engine: no ``max_bytes``, no hit figures). On any other
        device the pool stays empty and scopes routed to it pass allocations through.
    """

    def __init__(
        self,
        device: DeviceLike = "cpu",
        *,
        max_cached_bytes: Optional[ByteSize] = None,
        max_bytes: Optional[ByteSize] = None,
        release_after: ReleaseAfter = ENV.release_after,
        release_idle_s: ReleaseIdle = ENV.release_idle_s,
    ) -> None:
        self._device = parse_device(device)
        self._max_cached = parse_limit(max_cached_bytes, "max_cached_bytes")
        self._max_bytes = parse_limit(max_bytes, "max_bytes")
        self._release_after = parse_release_after(release_after)
        self._release_idle = parse_release_idle(release_idle_s)
        self._engine: Engine = engine_for(self._device)
        self._backend: PoolBackend = self._engine.new_pool(self._device, self._limits())
        self._warned_cap = False
        _ALL.add(self)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def engine(self) -> str:
        """The engine behind this pool: ``"native"``, ``"mempool"`` or ``"passthrough"``."""
        return self._engine.name

    def _limits(self) -> PoolLimits:
        after, learn_after = self._release_after
        idle, learn_idle = self._release_idle
        return PoolLimits(self._max_cached, self._max_bytes, after, idle, learn_after, learn_idle)

    def _configure(self) -> None:
        self._backend.configure(self._limits())

    @property
    def max_cached_bytes(self) -> Optional[int]:
        """Cap on the idle bytes this pool keeps; None means no cap. Lowering it releases the excess at once."""
        return self._max_cached

    @max_cached_bytes.setter
    def max_cached_bytes(self, value: Optional[ByteSize]) -> None:
        self._max_cached = parse_limit(value, "max_cached_bytes")
        self._configure()

    @property
    def max_bytes(self) -> Optional[int]:
        """Hard limit on bytes in use plus cached; None means no limit."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: Optional[ByteSize]) -> None:
        self._max_bytes = parse_limit(value, "max_bytes")
        self._configure()

    @property
    def release_after(self) -> ReleaseAfter:
        """Cached memory no allocation reused during this many outermost-scope exits is released; "auto" learns.

        Setting it starts the clocks over (what they learned is forgotten).
        """
        after, learns = self._release_after
        return "auto" if learns else after

    @release_after.setter
    def release_after(self, value: ReleaseAfter) -> None:
        self._release_after = parse_release_after(value)
        self._configure()

    @property
    def release_idle_s(self) -> ReleaseIdle:
        """Seconds after which unused cached memory is released by itself; None means never, "auto" learns.

        Setting it starts the clocks over (what they learned is forgotten).
        """
        idle, learns = self._release_idle
        return "auto" if learns else idle

    @release_idle_s.setter
    def release_idle_s(self, value: ReleaseIdle) -> None:
        self._release_idle = parse_release_idle(value)
        self._configure()

    def stats(self) -> PoolStats:
        """A snapshot of this pool's figures."""
        return self._backend.stats()

    def empty_cache(self) -> None:
        """Release every cached block to the system. Blocks lent to live tensors are untouched."""
        self._backend.release(True)

    def trim(self) -> None:
        """Release the cached memory no allocation reused during the last ``release_after`` exits (what exits do)."""
        self._backend.release(False)

    def segments(self) -> list[dict[str, Any]]:
        """This pool's memory in PyTorch's memory-snapshot segment format."""
        segments = self._backend.segments()
        for segment in segments:
            clean_blocks(segment["blocks"])
        return segments

    def trace(self) -> list[dict[str, Any]]:
        """Alloc/free events recorded while profiling, oldest first (empty when never profiled)."""
        return clean_blocks(self._backend.trace())

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"TensorPool(device='{self._device}', engine='{self.engine}', in_use={s.bytes_in_use}, "
            f"cached={s.bytes_cached}, max_cached_bytes={self._max_cached})"
        )


def get_pool(device: DeviceLike = "cpu") -> TensorPool:
    """Return the process-wide pool of ``device``, creating it on first use.

    Example::

        stats = poolscope.get_pool("cpu").stats()
        print(stats.bytes_in_use, stats.hits)

    Raises:
        PoolscopeTypeError, PoolscopeValueError: for something that is not an available device.
    """
    pool = _SHARED.get(device) if isinstance(device, torch.device) else None
    if pool is not None:
        return pool
    dev = parse_device(device)
    pool = _SHARED.get(dev)
    if pool is None:
        with _lock:
            pool = _SHARED.get(dev)
            if pool is None:
                pool = _SHARED[dev] = TensorPool(dev, max_cached_bytes=ENV.max_cached)
    return pool


def all_pools() -> list[TensorPool]:
    """Every pool alive in this process: the shared ones first, then user-made ones."""
    shared = list(_SHARED.values())
    return shared + [p for p in list(_ALL) if p not in shared]


def release_unused() -> None:
    """Release every pool's cached memory to the system (live tensors keep theirs).

    Example::

        run_big_batch()
        poolscope.release_unused()   # RSS falls by what the pools held idle
    """
    for pool in all_pools():
        pool.empty_cache()
