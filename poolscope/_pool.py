"""Per-device pools of large blocks, lent to tensors and taken back when the last reference dies.

A lent tensor gets a storage of its own whose memory is a prefix of a pooled
block (see ``storage_alias``). The storage keeps a private view of the block,
the *sentinel*, alive; a weak reference to the sentinel (the ``_Lease``)
fires when the storage dies, which is after every tensor, view, storage object
and autograd-saved tensor sharing it is gone. Only then can the block be lent
again, so a block is never lent twice and never reused while referenced.

Weak-reference callbacks can run in any thread and at any point, even while
this module holds its lock (a garbage collection started inside it), so they
only append to a deque; the pool folds that deque in under its lock before it
reads or changes anything.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Optional

import torch

from ._config import DEFAULT_MAX_CACHED, DeviceLike, parse_bytes, parse_cap, parse_device
from ._stats import PoolStats
from ._faults import should_fail_growth, step
from ._torch_compat import current_stream_key, dlpack_keeps, no_python_dispatch, storage_alias

__all__ = ["TensorPool", "get_pool"]

# One lock for every pool: a scope's escape tally can be touched by the pools
# of several devices.
_LOCK = threading.Lock()
_POOLS: dict[torch.device, TensorPool] = {}
_ALL_POOLS: weakref.WeakSet[TensorPool] = weakref.WeakSet()
_fork_hook_installed = False
_log = logging.getLogger("poolscope")

TRACE_LIMIT = 100_000  # events kept per pool while profiling

_SMALL_GRANULE = 512
_STEPS_PER_DOUBLING = 4  # size classes 1, 1.25, 1.5, 1.75 x 2**k: waste < 1.25x


def size_class(nbytes: int) -> int:
    """Bytes reserved for a request of ``nbytes``: at most 1.25x the request."""
    if nbytes <= 8 * _SMALL_GRANULE:
        return -(-nbytes // _SMALL_GRANULE) * _SMALL_GRANULE
    step = 1 << (nbytes.bit_length() - 1 - 2)
    return -(-nbytes // step) * step


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(strides))


def _reset_lock_after_fork() -> None:
    # A thread of the parent may have held the lock at the fork; that thread
    # does not exist in the child.
    global _LOCK
    _LOCK = threading.Lock()


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_reset_lock_after_fork)
        _fork_hook_installed = True


class Tally:
    """The blocks lent on behalf of one scope that are still alive, and their peak."""

    __slots__ = ("leases", "live_bytes", "peak_bytes")

    def __init__(self) -> None:
        self.leases: dict[int, Lease] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def hand_over(self, parent: Tally) -> None:
        """Move the still-live blocks to ``parent``: they escaped into the enclosing scope."""
        with _LOCK:
            for lease in self.leases.values():
                lease.tally = parent
            parent.leases.update(self.leases)
            parent.live_bytes += self.live_bytes
            parent.peak_bytes = max(parent.peak_bytes, parent.live_bytes)
            self.leases = {}
            self.live_bytes = 0


class Lease(weakref.ref):
    """A weak reference to a lent block's sentinel, carrying what to give back.

    ``shape``, ``dtype`` and (when profiling) ``frames`` describe the tensor
    that took the block, for leak reports and snapshots.
    """

    __slots__ = ("block", "key", "requested", "tally", "shape", "dtype", "frames", "freed_ns")

    def __new__(cls, sentinel, callback, *_):  # type: ignore[no-untyped-def]
        return super().__new__(cls, sentinel, callback)

    def __init__(self, sentinel, callback, block, key, requested, tally, shape, dtype, frames):  # type: ignore[no-untyped-def]
        super().__init__(sentinel, callback)
        self.block = block
        self.key = key
        self.requested = requested
        self.tally = tally
        self.shape = shape
        self.dtype = dtype
        self.frames = frames
        self.freed_ns = 0


class TensorPool:
    """A cache of large memory blocks on one device.

    Blocks are lent to tensors created inside a :func:`pool_scope` (or by the
    seed-compatible :meth:`GlobalMemoryPool.allocate`) and come back on their
    own when the last reference to that memory dies. There is no deallocate.

    Example::

        pool = poolscope.get_pool("cpu")
        pool.max_cached_bytes = "512MiB"
        with poolscope.pool_scope(pool=pool):
            y = model(x)
        print(pool.stats().hits)
        pool.empty_cache()

    Args:
        device: the device whose memory this pool holds.
        max_cached_bytes: cap on idle cached bytes (int or "512MiB"); None
            means no cap. Blocks above the cap are freed, oldest first, when
            they come back and when a scope exits.
        max_bytes: hard limit on lent plus cached bytes, like CuPy's
            ``set_limit``; None means none. When growing would pass it, or the
            device is out of memory, the pool frees its cache and tries once
            more, then lets PyTorch's ordinary allocator serve the request.

    Raises:
        TypeError, ValueError: for a bad device or cap.
    """

    def __init__(
        self,
        device: DeviceLike = "cpu",
        *,
        max_cached_bytes: int | str | None = None,
        max_bytes: int | str | None = None,
    ) -> None:
        _install_fork_hook()
        self._device = parse_device(device)
        self._cap = parse_cap(max_cached_bytes)
        self._max_bytes = None if max_bytes is None else parse_bytes(max_bytes, "max_bytes")
        self._growing = 0
        self._fallbacks = 0
        self._free: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
        self._cache_order: dict[int, tuple[int, int]] = {}  # id(block) -> key, oldest first
        self._live: dict[int, Lease] = {}
        self._released: collections.deque[Lease] = collections.deque()
        self._bytes_in_use = 0
        self._bytes_requested = 0
        self._bytes_cached = 0
        self._peak = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._trace: Optional[collections.deque[dict[str, Any]]] = None  # created by the first profiled lend
        self.warned_cap = False
        _ALL_POOLS.add(self)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def max_bytes(self) -> int | None:
        """Hard limit on the bytes this pool reserves (lent + cached); None means no limit.

        Past it the pool first frees its cache; if that is not enough the
        allocation goes to PyTorch's ordinary allocator (``stats().fallbacks``).
        """
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | str | None) -> None:
        self._max_bytes = None if value is None else parse_bytes(value, "max_bytes")

    @property
    def max_cached_bytes(self) -> int | None:
        """Cap on the idle bytes this pool keeps; None means no cap."""
        return self._cap

    @max_cached_bytes.setter
    def max_cached_bytes(self, value: int | str | None) -> None:
        cap = parse_cap(value)
        with _LOCK:
            self._cap = cap
            evicted = self._settle_locked(cap)
        del evicted

    def stats(self) -> PoolStats:
        """Return a snapshot of this pool's figures."""
        with _LOCK:
            evicted = self._settle_locked(self._cap)
            stats = PoolStats(
                device=str(self._device),
                bytes_in_use=self._bytes_in_use,
                bytes_requested=self._bytes_requested,
                bytes_cached=self._bytes_cached,
                bytes_reserved=self._bytes_in_use + self._bytes_cached,
                peak_bytes_in_use=self._peak,
                blocks_in_use=len(self._live),
                blocks_cached=len(self._cache_order),
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                fallbacks=self._fallbacks,
                max_cached_bytes=self._cap,
                max_bytes=self._max_bytes,
            )
        del evicted
        return stats

    def empty_cache(self) -> None:
        """Free every cached block. Blocks lent to live tensors are untouched."""
        with _LOCK:
            evicted = self._settle_locked(0)
        del evicted

    def trim(self) -> None:
        """Free cached blocks above ``max_cached_bytes`` (scopes call this on exit)."""
        with _LOCK:
            evicted = self._settle_locked(self._cap)
        del evicted

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"TensorPool(device='{self._device}', in_use={s.bytes_in_use}, cached={s.bytes_cached}, "
            f"max_cached_bytes={self._cap})"
        )

    def lend(
        self,
        size: Sequence[int],
        stride: Sequence[int],
        dtype: torch.dtype,
        nbytes: int,
        tally: Optional[Tally] = None,
        frames: Optional[list[dict[str, Any]]] = None,
    ) -> Optional[tuple[torch.Tensor, bool]]:
        """Return an uninitialised tensor over a pooled block and whether it was a cache hit.

        ``nbytes`` must be the storage size that ``size``/``stride``/``dtype``
        need. ``frames`` (Python frames, innermost first) turns on tracing of
        this block for :func:`poolscope.snapshot`. Returns None when the pool
        cannot grow (out of memory, or ``max_bytes`` reached even after
        releasing its cache): the caller then uses the ordinary allocator.
        """
        cls = size_class(nbytes)
        key = (current_stream_key(self._device), cls)
        step("lend.lookup")
        with _LOCK:
            evicted = self._settle_locked(self._cap)
            free = self._free.get(key)
            block = None
            if free:
                block_id, block = free.popitem()
                del self._cache_order[block_id]
                self._bytes_cached -= cls
        del evicted
        hit = block is not None
        if block is None:
            block = self._grow(cls)
            if block is None:
                return None
        out = sentinel = None
        try:
            step("lend.carve")
            with no_python_dispatch():
                if dlpack_keeps(dtype):
                    # The DLPack import carries dtype, size and strides over, and
                    # sizes its new storage exactly as empty_strided would.
                    sentinel = block.view(dtype).as_strided(size, stride)
                    out = storage_alias(sentinel)
                else:
                    sentinel = block[:nbytes]
                    out = torch.empty((0,), dtype=dtype, device=self._device)
                    out.set_(storage_alias(sentinel).untyped_storage(), 0, size, stride)
            callback = self._released.append if frames is None else self._release_traced
            lease = Lease(sentinel, callback, block, key, nbytes, tally, size, dtype, frames)
            step("lend.register")
        except BaseException:
            # Nothing outside this frame saw the block: drop our references to
            # it (the traceback would keep them) and put it back in the cache.
            out = sentinel = None
            self._return_unlent(key, block, grown=not hit)
            raise
        del sentinel
        with _LOCK:
            self._live[id(lease)] = lease
            self._bytes_in_use += cls
            if not hit:
                self._growing -= cls
            self._bytes_requested += nbytes
            if self._bytes_in_use > self._peak:
                self._peak = self._bytes_in_use
            if hit:
                self._hits += 1
            else:
                self._misses += 1
            if tally is not None:
                tally.leases[id(lease)] = lease
                tally.live_bytes += cls
                if tally.live_bytes > tally.peak_bytes:
                    tally.peak_bytes = tally.live_bytes
            if frames is not None:
                self._record_locked("segment_alloc" if not hit else None, lease, frames)
        return out, hit

    def _grow(self, cls: int) -> Optional[torch.Tensor]:
        """A new block, after releasing the cache and retrying once if the first try fails."""
        for attempt in range(2):
            step("lend.grow")
            with _LOCK:
                reserved = self._bytes_in_use + self._bytes_cached + self._growing
                allowed = self._max_bytes is None or reserved + cls <= self._max_bytes
                if allowed:
                    self._growing += cls
            if allowed:
                try:
                    if should_fail_growth():
                        raise torch.OutOfMemoryError(f"injected: cannot allocate {cls} bytes")
                    with no_python_dispatch():
                        block = torch.empty(cls, dtype=torch.uint8, device=self._device)
                except RuntimeError as exc:  # torch.OutOfMemoryError included
                    with _LOCK:
                        self._growing -= cls
                    _log.debug("pool %s could not grow by %d bytes: %s", self._device, cls, exc)
                else:
                    if _log.isEnabledFor(logging.DEBUG):
                        _log.debug("pool %s grew by a %d-byte block", self._device, cls)
                    return block
            if attempt == 0:
                self.empty_cache()
        with _LOCK:
            self._fallbacks += 1
        _log.debug("pool %s falls back to the ordinary allocator for %d bytes", self._device, cls)
        return None

    def _return_unlent(self, key: tuple[int, int], block: torch.Tensor, grown: bool) -> None:
        with _LOCK:
            if grown:
                self._growing -= key[1]
            self._free.setdefault(key, {})[id(block)] = block
            self._cache_order[id(block)] = key
            self._bytes_cached += key[1]
            evicted = self._settle_locked(self._cap)
        del evicted

    def _release_traced(self, lease: Lease) -> None:
        lease.freed_ns = time.time_ns()
        self._released.append(lease)

    def _record_locked(self, segment_action: Optional[str], lease: Lease, frames: list[dict[str, Any]]) -> None:
        if self._trace is None:
            self._trace = collections.deque(maxlen=TRACE_LIMIT)
        now = time.time_ns() // 1000
        addr, stream, cls = lease.block.data_ptr(), lease.key[0], lease.key[1]
        if segment_action is not None:
            self._trace.append(
                {"action": segment_action, "addr": addr, "size": cls, "stream": stream, "time_us": now, "frames": frames}
            )
        self._trace.append({"action": "alloc", "addr": addr, "size": cls, "stream": stream, "time_us": now, "frames": frames})

    def segments(self) -> list[dict[str, Any]]:
        """This pool's blocks in PyTorch's memory-snapshot segment format (one block per segment)."""
        with _LOCK:
            evicted = self._settle_locked(self._cap)
            blocks: list[tuple[torch.Tensor, Optional[Lease]]] = [
                (lease.block, lease) for lease in self._live.values() if lease.block is not None
            ]
            blocks += [(self._free[key][block_id], None) for block_id, key in self._cache_order.items()]
            segments = []
            for block, lease in blocks:
                size = block.numel()
                used = lease.requested if lease is not None else 0
                frames = (lease.frames or []) if lease is not None else []
                segments.append(
                    {
                        "device": self._device.index or 0,
                        "address": block.data_ptr(),
                        "total_size": size,
                        "allocated_size": used,
                        "active_size": used,
                        "requested_size": used,
                        "stream": lease.key[0] if lease is not None else 0,
                        "segment_type": "large",
                        "segment_pool_id": (0, 0),
                        "is_expandable": False,
                        "frames": [],
                        "blocks": [
                            {
                                "address": block.data_ptr(),
                                "size": size,
                                "requested_size": used,
                                "state": "active_allocated" if lease is not None else "inactive",
                                "frames": frames,
                            }
                        ],
                    }
                )
        del evicted
        return segments

    def trace(self) -> list[dict[str, Any]]:
        """Alloc/free events recorded while profiling, oldest first (empty when never profiled)."""
        with _LOCK:
            evicted = self._settle_locked(self._cap)
            events = list(self._trace or ())
        del evicted
        return events

    def _settle_locked(self, cap: int | None) -> list[torch.Tensor]:
        """Take back released blocks, then evict down to ``cap``.

        Returns the evicted blocks so that the caller frees them outside the lock.
        """
        released = self._released
        while released:
            lease = released.popleft()
            if self._live.pop(id(lease), None) is None:
                continue
            key = lease.key
            block = lease.block
            lease.block = None
            self._bytes_in_use -= key[1]
            self._bytes_requested -= lease.requested
            tally = lease.tally
            if tally is not None:
                del tally.leases[id(lease)]
                tally.live_bytes -= key[1]
            if lease.frames is not None and self._trace is not None:
                when = lease.freed_ns // 1000
                addr = block.data_ptr()
                for action in ("free_requested", "free_completed"):
                    self._trace.append(
                        {"action": action, "addr": addr, "size": key[1], "stream": key[0], "time_us": when, "frames": lease.frames}
                    )
            self._free.setdefault(key, {})[id(block)] = block
            self._cache_order[id(block)] = key
            self._bytes_cached += key[1]
        evicted: list[torch.Tensor] = []
        if cap is not None:
            order = self._cache_order
            while self._bytes_cached > cap:
                block_id = next(iter(order))
                key = order.pop(block_id)
                block = self._free[key].pop(block_id)
                evicted.append(block)
                self._bytes_cached -= key[1]
                self._evictions += 1
                if self._trace is not None:
                    self._trace.append(
                        {"action": "segment_free", "addr": block.data_ptr(), "size": key[1], "stream": key[0],
                         "time_us": time.time_ns() // 1000, "frames": []}
                    )
            if evicted and _log.isEnabledFor(logging.DEBUG):
                _log.debug(
                    "pool %s evicted %d block(s) to stay under max_cached_bytes=%s", self._device, len(evicted), cap
                )
        return evicted


def get_pool(device: DeviceLike = "cpu") -> TensorPool:
    """Return the process-wide pool of ``device``, creating it on first use.

    Example::

        stats = poolscope.get_pool("cpu").stats()
        print(stats.bytes_in_use, stats.hits)

    Raises:
        TypeError, ValueError: for something that is not an available device.
    """
    pool = _POOLS.get(device) if isinstance(device, torch.device) else None
    if pool is not None:
        return pool
    dev = parse_device(device)
    pool = _POOLS.get(dev)
    if pool is None:
        with _LOCK:
            pool = _POOLS.get(dev)
            if pool is None:
                pool = _POOLS[dev] = TensorPool(dev, max_cached_bytes=DEFAULT_MAX_CACHED)
    return pool


def all_pools() -> list[TensorPool]:
    """Every pool alive in this process: the shared ones first, then user-made ones."""
    shared = list(_POOLS.values())
    return shared + [p for p in list(_ALL_POOLS) if p not in shared]
