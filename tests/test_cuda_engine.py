"""The CUDA engine's routing logic, driven on CPU through a fake of PyTorch's private-pool API.

The fake behaves as PyTorch's caching allocator does where it matters: a thread's allocation
goes to the *first* pool begun for that thread that is still open (which is why nested
``use_mem_pool`` blocks receive nothing), and a pool's segments come back in the memory
snapshot format. tests/test_cuda.py runs the real thing where a GPU exists.
"""

from __future__ import annotations

import threading
from itertools import count

import pytest
import torch

from poolscope.engines.mempool import CudaEngine
from poolscope.engines.base import PoolLimits, ScopeOptions

DEVICE = torch.device("cuda", 0)


class FakeMemPool:
    ids = count(1)

    def __init__(self) -> None:
        self.id = (next(self.ids), 0)
        self.blocks: list[dict] = []


class FakeAPI:
    def __init__(self) -> None:
        self.routes: list[tuple[int, int, FakeMemPool]] = []  # (device, thread, pool), begin order
        self.calls: list[tuple] = []
        self.pools: list[FakeMemPool] = []
        self.emptied = 0
        self.recording = False
        self._addresses = count(0x1000, 0x1000)

    def new_pool(self) -> FakeMemPool:
        pool = FakeMemPool()
        self.pools.append(pool)
        return pool

    def begin(self, device: int, pool: FakeMemPool) -> None:
        self.calls.append(("begin", pool.id))
        self.routes.append((device, threading.get_ident(), pool))

    def end(self, device: int, pool: FakeMemPool) -> None:
        self.calls.append(("end", pool.id))
        self.routes = [r for r in self.routes if not (r[0] == device and r[2] is pool)]

    def segments(self, pool: FakeMemPool) -> list:
        return [{"total_size": b["size"], "blocks": [dict(b)]} for b in pool.blocks]

    def empty_cache(self) -> None:
        self.emptied += 1

    def record_history(self) -> None:
        self.recording = True

    # What a CUDA allocation of the calling thread does.
    def allocate(self, size: int, device: int = 0) -> tuple[FakeMemPool | None, int]:
        me = threading.get_ident()
        for dev, thread, pool in self.routes:  # the first matching route wins, as in PyTorch
            if dev == device and thread == me:
                for b in pool.blocks:
                    if b["state"] == "inactive" and b["size"] >= size:
                        b["state"] = "active_allocated"
                        return pool, b["address"]
                address = next(self._addresses)
                pool.blocks.append({"address": address, "size": size, "requested_size": size, "state": "active_allocated"})
                return pool, address
        return None, 0

    def free(self, pool: FakeMemPool, address: int) -> None:
        for b in pool.blocks:
            if b["address"] == address:
                b["state"] = "inactive"


@pytest.fixture
def fake():
    return FakeAPI()


@pytest.fixture
def engine(fake):
    return CudaEngine(fake)


def new_pool(engine, release_after=100, release_idle_s=None):
    return engine.new_pool(DEVICE, PoolLimits(release_after=release_after, release_idle_s=release_idle_s))


def new_scope(engine, pool, profiling=False):
    return engine.new_scope(pool, ScopeOptions(threshold=1 << 20, profiling=profiling))


def test_allocations_go_to_the_scope_pool_and_stop_at_exit(engine, fake):
    pool = new_pool(engine)
    scope = new_scope(engine, pool)
    scope.enter()
    where, _ = fake.allocate(100)
    assert where is pool.mempool()
    assert scope.exit() == "ok"
    assert fake.allocate(100)[0] is None
    assert fake.routes == []


def test_nested_scopes_route_to_the_innermost_pool_then_back(engine, fake):
    outer_pool, inner_pool = new_pool(engine), new_pool(engine)
    outer, inner = new_scope(engine, outer_pool), new_scope(engine, inner_pool)
    outer.enter()
    inner.enter()
    assert fake.allocate(10)[0] is inner_pool.mempool()  # with use_mem_pool nested, the outer pool gets it
    inner.exit()
    assert fake.allocate(10)[0] is outer_pool.mempool()
    outer.exit()
    assert fake.routes == []


def test_nesting_on_one_pool_begins_it_once(engine, fake):
    pool = new_pool(engine)
    a, b = new_scope(engine, pool), new_scope(engine, pool)
    a.enter()
    b.enter()
    b.exit()
    assert fake.allocate(10)[0] is pool.mempool()
    a.exit()
    assert fake.calls == [("begin", pool.mempool().id), ("end", pool.mempool().id)]


def test_out_of_order_exit_keeps_the_innermost_routing(engine, fake):
    outer_pool, inner_pool = new_pool(engine), new_pool(engine)
    outer, inner = new_scope(engine, outer_pool), new_scope(engine, inner_pool)
    outer.enter()
    inner.enter()
    outer.exit()  # a generator's scope closed inside its caller's
    assert fake.allocate(10)[0] is inner_pool.mempool()
    inner.exit()
    assert fake.routes == []


def test_exit_from_another_thread_closes_the_scope(engine, fake):
    pool = new_pool(engine)
    scope = new_scope(engine, pool)
    scope.enter()
    outcome = []
    t = threading.Thread(target=lambda: outcome.append(scope.exit()))
    t.start()
    t.join()
    assert outcome == ["ok"] and scope.exit() == "not_active"
    assert scope.stats().escaped == 0


def test_other_threads_are_not_routed(engine, fake):
    pool = new_pool(engine)
    scope = new_scope(engine, pool)
    scope.enter()
    seen = []
    t = threading.Thread(target=lambda: seen.append(fake.allocate(10)[0]))
    t.start()
    t.join()
    scope.exit()
    assert seen == [None]


def test_escapes_and_figures_come_from_the_pools_own_snapshot(engine, fake):
    pool = new_pool(engine)
    first = new_scope(engine, pool)
    first.enter()
    p, kept = fake.allocate(4 << 20)
    _, dropped = fake.allocate(1 << 20)
    fake.free(p, dropped)
    first.exit()
    assert first.stats().escaped == 1 and first.stats().bytes_in_use == 4 << 20
    assert [b["address"] for b in first.live_blocks()] == [kept]
    second = new_scope(engine, pool)
    second.enter()
    fake.allocate(1 << 20)  # reuses the freed block
    second.exit()
    assert second.stats().escaped == 1  # the earlier scope's survivor is not counted again
    stats = pool.stats()
    assert stats.bytes_in_use == 5 << 20 and stats.blocks_in_use == 2 and stats.segments == 2


def test_a_pool_unused_for_release_after_exits_is_handed_back(engine, fake):
    idle, busy = new_pool(engine, release_after=3), new_pool(engine, release_after=3)
    scope = new_scope(engine, idle)
    scope.enter()
    p, address = fake.allocate(8 << 20)
    fake.free(p, address)
    scope.exit()
    assert fake.emptied == 0
    for _ in range(4):
        s = new_scope(engine, busy)
        s.enter()
        s.exit()
    assert fake.emptied == 1 and idle.segments() == []
    assert busy.segments() == []  # never allocated from: nothing to hand back


def _use_once(engine, fake, pool, size=8 << 20):
    scope = new_scope(engine, pool)
    scope.enter()
    p, address = fake.allocate(size)
    fake.free(p, address)
    scope.exit()


def test_a_pool_nothing_used_for_release_idle_s_is_handed_back_by_time(fake):
    now = [100.0]
    engine = CudaEngine(fake, clock=lambda: now[0])
    pool = new_pool(engine, release_idle_s=5.0)
    _use_once(engine, fake, pool)
    now[0] += 4
    assert engine.release_idle() == pytest.approx(105.0) and fake.emptied == 0
    now[0] += 2
    assert engine.release_idle() is None
    assert fake.emptied == 1 and pool.segments() == []
    stats = pool.stats()
    assert stats.bytes_released_by_time == 8 << 20 and stats.bytes_released_by_exits == 0


def test_a_pool_in_use_is_not_handed_back_by_time(fake):
    now = [0.0]
    engine = CudaEngine(fake, clock=lambda: now[0])
    pool = new_pool(engine, release_idle_s=1.0)
    _use_once(engine, fake, pool)
    scope = new_scope(engine, pool)
    scope.enter()  # open again: its memory is the scope's to use
    now[0] += 10
    engine.release_idle()
    assert fake.emptied == 0
    scope.exit()
    now[0] += 10
    engine.release_idle()
    assert fake.emptied == 1


def test_the_idle_releaser_runs_without_any_call(engine, fake):
    import time

    pool = new_pool(engine, release_idle_s=0.05)
    _use_once(engine, fake, pool)
    deadline = time.monotonic() + 5
    while fake.emptied == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.emptied == 1 and pool.stats().bytes_released_by_time == 8 << 20


def test_a_pool_with_live_blocks_is_kept(engine, fake):
    pool = new_pool(engine, release_after=0)
    scope = new_scope(engine, pool)
    scope.enter()
    fake.allocate(8 << 20)
    scope.exit()
    pool.release(everything=True)
    assert fake.emptied == 0 and pool.stats().blocks_in_use == 1


def test_profiling_records_history(engine, fake):
    scope = new_scope(engine, new_pool(engine), profiling=True)
    scope.enter()
    scope.exit()
    assert fake.recording


def test_without_cuda_cuda_devices_get_the_passthrough_engine():
    from poolscope.engines import _pick_cuda_engine
    from poolscope._torch_compat import CudaAllocatorAPI

    if CudaAllocatorAPI.available():
        pytest.skip("this machine has CUDA: tests/test_cuda.py covers it")
    assert _pick_cuda_engine().name == "passthrough"
