"""The CUDA engine: a scope sends its thread's CUDA allocations to a private ``torch.cuda.MemPool``.

PyTorch's caching allocator already caches CUDA memory, so a scope's value there is keeping a
forward's transient tensors out of the blocks that hold long-lived state, per-scope figures,
``strict``, and handing the pool's memory back. Routing is PyTorch's own, in C++
(``beginAllocateCurrentThreadToPool``): no Python runs per op, blocks stay per stream as the
caching allocator keeps them (a block is never reused on another stream before the work that
used it is done), and results are PyTorch's.

What this engine adds to ``torch.cuda.use_mem_pool``: nesting (PyTorch routes a thread to the
first pool that was begun, so an inner pool would receive nothing; here only the innermost
scope's pool is begun, and the outer one again when it exits), figures per scope, escapes and
``strict``, and release of a pool nobody uses any more. All calls into PyTorch go through
``CudaAllocatorAPI`` (``poolscope._torch_compat``), which the CPU tests replace with a fake.

Limits: the caching allocator routes every allocation of the thread, so ``threshold`` does
not apply on CUDA; it has no per-pool limit, so ``max_bytes`` is refused for CUDA scopes;
hits, misses and peaks are not visible per pool; autograd's backward runs in PyTorch's device
threads, which a scope does not route (as with ``use_mem_pool``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

import torch

from .._forksafe import ForkSafeLock
from .._stats import PoolStats, ScopeStats
from .base import PoolLimits, PythonPushPop, ScopeOptions
from .passthrough import empty_pool_stats

__all__ = ["CudaEngine"]

ACTIVE = "active_allocated"


class _Stacks(threading.local):
    """Open CUDA scopes of this thread, per device index, innermost last."""

    def __init__(self) -> None:
        self.by_device: dict[int, list[CudaScope]] = {}


class CudaPool:
    """One device's private pool: a MemPool, made on first use."""

    def __init__(self, engine: CudaEngine, device: torch.device, limits: PoolLimits) -> None:
        self._engine = engine
        self.device = str(device)
        self.device_index = device.index or 0
        self._mempool: Any = None
        self.idle_exits = 0
        self.open_scopes = 0  # in every thread; under the engine's lock
        self.last_used = engine.clock()
        self.released = {"exits": 0, "time": 0}
        self.configure(limits)

    def mempool(self) -> Any:
        """The MemPool, made on first use. Call with the engine's lock held (see ``release``)."""
        if self._mempool is None:
            self._mempool = self._engine.api.new_pool()
        return self._mempool

    def configure(self, limits: PoolLimits) -> None:
        self.limits = limits
        self.release_after = limits.release_after
        self.release_idle_s = limits.release_idle_s
        if self._mempool is not None and self.release_idle_s is not None:
            self._engine.schedule()

    def blocks(self) -> list[dict[str, Any]]:
        return [b for s in self.segments() for b in s["blocks"]]

    def stats(self) -> PoolStats:
        # Hits, misses, peaks and releases by count are not visible per pool on CUDA: they stay 0.
        segments = self.segments()
        blocks = [b for s in segments for b in s["blocks"]]
        active = [b for b in blocks if b["state"] == ACTIVE]
        in_use = sum(b["size"] for b in active)
        reserved = sum(s["total_size"] for s in segments)
        return empty_pool_stats(
            self.device, self.limits,
            bytes_in_use=in_use,
            bytes_requested=sum(b.get("requested_size", b["size"]) for b in active),
            bytes_cached=reserved - in_use,
            bytes_reserved=reserved,
            blocks_in_use=len(active),
            blocks_cached=len(blocks) - len(active),
            segments=len(segments),
            bytes_released=self.released["exits"] + self.released["time"],
            bytes_released_by_exits=self.released["exits"],
            bytes_released_by_time=self.released["time"],
        )

    def release(self, everything: bool, reason: Optional[str] = None) -> None:
        """Hand the pool's memory back to PyTorch's allocator once nothing in it is in use.

        Dropping the MemPool makes its segments freeable; ``torch.cuda.empty_cache`` frees them
        (and, as it always does, the device's other unused cached blocks). The test of open
        scopes and the drop happen under the engine's lock, the one a scope's entry counts
        itself under before it routes: a scope entering meanwhile either counts first (nothing
        is released) or makes a new MemPool after the drop.
        """
        with self._engine.lock:
            if self._mempool is None or self.open_scopes or any(b["state"] == ACTIVE for b in self.blocks()):
                return
            held = sum(s["total_size"] for s in self.segments())
            self._mempool = None
        self._engine.api.empty_cache()
        if reason is not None:
            self.released[reason] += held

    def segments(self) -> list[dict[str, Any]]:
        mempool = self._mempool  # read once: the releaser may drop it meanwhile
        return [] if mempool is None else self._engine.api.segments(mempool)

    def trace(self) -> list[dict[str, Any]]:
        return []


class CudaScope:
    """One activation of a scope on a CUDA device."""

    def __init__(self, engine: CudaEngine, pool: CudaPool, options: ScopeOptions) -> None:
        self._engine = engine
        self.pool = pool
        self._name = options.name
        self._profiling = options.profiling
        self._owner: Optional[int] = None
        self._routed: Any = None  # the MemPool this scope's entry began routing to
        self._closed_elsewhere = False
        self._before: set[int] = set()
        self._final: Optional[list[dict[str, Any]]] = None

    def enter(self) -> None:
        if self._profiling:
            self._engine.api.record_history()
        stack = self._engine.drop_closed_elsewhere(self.pool.device_index)
        with self._engine.lock:
            # Counted before it routes, and its MemPool taken under the same lock: the releaser
            # cannot drop the MemPool between the two (CudaPool.release).
            self.pool.open_scopes += 1
            self._routed = self.pool.mempool()
        self._before = {b["address"] for b in self.pool.blocks() if b["state"] == ACTIVE}
        self._final = None
        self._closed_elsewhere = False
        top = stack[-1] if stack else None
        if top is None or top.pool is not self.pool:
            if top is not None:
                self._engine.api.end(self.pool.device_index, top._routed)
            self._engine.api.begin(self.pool.device_index, self._routed)
        stack.append(self)
        self._owner = threading.get_ident()

    def exit(self) -> str:
        if self._owner is None:
            return "not_active"
        if self._owner != threading.get_ident():
            # A generator's scope finalized in another thread: the scope closes here; its owner
            # thread stops routing to it at its next scope entry or exit (PyTorch routes per
            # thread, and only the owner's own calls can change that thread's routing).
            self._owner = None
            self._closed_elsewhere = True
            self._final = self.live_blocks()
            return "ok"
        stack = self._engine.drop_closed_elsewhere(self.pool.device_index)
        was_top = stack[-1] is self
        stack.remove(self)
        self._owner = None
        self._unroute(stack, was_top)
        self._final = self.live_blocks()
        if not stack:
            self._engine.outermost_exit(self.pool)
        return "ok"

    def _unroute(self, stack: list[CudaScope], was_top: bool) -> None:
        """Off the stack: route to the new innermost scope's pool, and count this one closed."""
        new_top = stack[-1] if stack else None
        if was_top and (new_top is None or new_top.pool is not self.pool):
            # Only the innermost scope's pool is routed: PyTorch would send everything to the first.
            self._engine.api.end(self.pool.device_index, self._routed)
            if new_top is not None:
                self._engine.api.begin(self.pool.device_index, new_top._routed)
        with self._engine.lock:
            self.pool.open_scopes -= 1

    def live_blocks(self) -> list[dict[str, Any]]:
        """Blocks that became active while this scope was open and are still active."""
        return [
            {"address": b["address"], "size": b["size"], "requested_size": b.get("requested_size", b["size"]),
             "frames": b.get("frames", [])}
            for b in self.pool.blocks()
            if b["state"] == ACTIVE and b["address"] not in self._before
        ]

    def stats(self) -> ScopeStats:
        # Routed counts, hits and peaks are not visible per pool on CUDA: they stay 0.
        live = self.live_blocks()
        return ScopeStats(name=self._name, escaped=len(live), bytes_in_use=sum(b["size"] for b in live))

    def reset_peak(self) -> None:
        pass

    def refusal(self) -> None:
        return None  # max_bytes is refused for CUDA scopes


class CudaEngine(PythonPushPop):
    name = "mempool"

    def __init__(self, api: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.clock = clock
        self._stacks = _Stacks()
        self.lock = ForkSafeLock()
        self._pools: list[CudaPool] = []
        self._wake = threading.Event()
        self._releaser: Optional[threading.Thread] = None

    def stack(self, device_index: int) -> list[CudaScope]:
        return self._stacks.by_device.setdefault(device_index, [])

    def drop_closed_elsewhere(self, device_index: int) -> list[CudaScope]:
        """The calling thread's stack, without the scopes another thread closed (routing fixed)."""
        stack = self.stack(device_index)
        while any(s._closed_elsewhere for s in stack):
            scope = next(s for s in stack if s._closed_elsewhere)
            was_top = stack[-1] is scope
            stack.remove(scope)
            scope._closed_elsewhere = False
            scope._unroute(stack, was_top)
            if not stack:
                self.outermost_exit(scope.pool)
        return stack

    def outermost_exit(self, used: CudaPool) -> None:
        """Count an outermost exit; a pool unused for ``release_after`` of them is handed back."""
        with self.lock:
            pools = list(self._pools)
        used.last_used = self.clock()
        for pool in pools:
            pool.idle_exits = 0 if pool is used else pool.idle_exits + 1
            if pool.idle_exits > pool.release_after:
                pool.release(everything=True, reason="exits")
        self.schedule()

    def release_idle(self) -> Optional[float]:
        """Hand back every pool nothing used for its ``release_idle_s``; return the next deadline (None: none)."""
        now = self.clock()
        with self.lock:
            pools = list(self._pools)
        deadlines = []
        for pool in pools:
            if pool.release_idle_s is None or pool.segments() == []:
                continue
            due = pool.last_used + pool.release_idle_s
            if due <= now:
                pool.release(everything=True, reason="time")
            if pool.segments():
                deadlines.append(max(due, now + pool.release_idle_s / 10))  # busy now: look again later
        return min(deadlines, default=None)

    def schedule(self) -> None:
        """Make sure the idle releaser runs (a daemon thread, asleep until the next deadline)."""
        with self.lock:
            if self._releaser is None or not self._releaser.is_alive():
                self._releaser = threading.Thread(target=self._release_loop, name="poolscope-cuda-releaser", daemon=True)
                self._releaser.start()
        self._wake.set()

    def _release_loop(self) -> None:
        while True:
            deadline = self.release_idle()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            self._wake.wait(timeout)
            self._wake.clear()

    def new_pool(self, device: torch.device, limits: PoolLimits) -> CudaPool:
        pool = CudaPool(self, device, limits)
        with self.lock:
            self._pools.append(pool)
        return pool

    def new_scope(self, pool: Any, options: ScopeOptions) -> CudaScope:
        return CudaScope(self, pool, options)

