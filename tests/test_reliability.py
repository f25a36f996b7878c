"""Bad input, out of memory, injected faults, threads, garbage cycles and long runs: nothing lost."""

from __future__ import annotations

import gc
import os
import queue
import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poolscope
from conftest import open_scopes
from poolscope.engines import engine_for
from poolscope.testing import assert_no_leaks
from helpers import MiB


# --- bad input catalogue ---------------------------------------------------------------------

BAD_INPUTS = [
    (lambda: poolscope.pool_scope(threshold="-1MiB"), ValueError, r"threshold must be .*got '-1MiB'"),
    (lambda: poolscope.pool_scope(threshold="1e3MiB"), ValueError, r"got '1e3MiB'"),
    (lambda: poolscope.pool_scope(threshold=float("nan")), TypeError, r"got nan of type float"),
    (lambda: poolscope.pool_scope(threshold=[1]), TypeError, r"got \[1\] of type list"),
    (lambda: poolscope.pool_scope(capture="ops"), ValueError, r"capture must be one of \('all', 'factories'\); got 'ops'"),
    (lambda: poolscope.pool_scope(max_bytes="-4MiB"), ValueError, r"max_bytes must be .*got '-4MiB'"),
    (lambda: poolscope.pool_scope(on_limit=None), TypeError, r"on_limit must be one of \('raise', 'fallback'\); got None"),
    (lambda: poolscope.TensorPool("cpu", release_after=-1), ValueError, r"release_after must be an int >= 0; got -1"),
    (lambda: poolscope.TensorPool("cpu", release_after=1.5), TypeError, r"release_after must be an int >= 0 or 'auto'; got 1.5"),
    (lambda: poolscope.TensorPool("cpu", release_after="often"), ValueError, r"release_after must be an int >= 0 or 'auto'; got 'often'"),
    (lambda: poolscope.engine("cuda:7x"), ValueError, r"is not a device"),
    (lambda: poolscope.pool_scope(capture=None), TypeError, r"capture must be one of"),
    (lambda: poolscope.pool_scope("quantum"), ValueError, r"device 'quantum' is not a device"),
    (lambda: poolscope.pool_scope(-1), ValueError, r"device -1 is not a device"),
    (lambda: poolscope.pool_scope(device=object()), TypeError, r"device must be a str, torch.device or int"),
    (lambda: poolscope.pool_scope(enable_profiling="yes"), TypeError, r"enable_profiling must be True or False"),
    (lambda: poolscope.pooled_forward(poolscope.TensorPool), TypeError, r"not the class TensorPool"),
    (lambda: poolscope.pooled_forward(threshold="big"), ValueError, r"got 'big'"),
    (lambda: poolscope.pooled_forward("forward"), TypeError, r"needs a function or method; got 'forward'"),
    (lambda: poolscope.get_pool("meta"), ValueError, r"device 'meta' has no memory to pool"),
    (lambda: poolscope.get_pool(3.0), TypeError, r"got 3.0 of type float"),
    (lambda: poolscope.TensorPool("cpu", max_cached_bytes=-1), ValueError, r"max_cached_bytes must be >= 0 bytes; got -1"),
    (lambda: poolscope.TensorPool("cpu", max_bytes="lots"), ValueError, r"max_bytes must be .*got 'lots'"),
    (lambda: poolscope.TensorPool("cpu", max_bytes=True), TypeError, r"max_bytes must be .*got True"),
    (lambda: setattr(poolscope.TensorPool("cpu"), "max_cached_bytes", float("inf")), TypeError, r"got inf"),
    (lambda: poolscope.get_global_memory_pool(enable_profiling=None), TypeError, r"enable_profiling must be True or False"),
    (lambda: poolscope.get_global_memory_pool().allocate((2, -3), torch.float32), ValueError, r"negative sizes"),
    (lambda: poolscope.get_global_memory_pool().allocate("2x3", torch.float32), TypeError, r"shape must be an int or a sequence"),
    (lambda: poolscope.get_global_memory_pool().allocate((2,), torch.float32, "gpu"), ValueError, r"'gpu' is not a device"),
    (lambda: poolscope.get_global_memory_pool().allocate((2,), torch.float32, zero_init=1), TypeError, r"zero_init must be True or False"),
    (lambda: poolscope.get_global_memory_pool().deallocate(None), TypeError, r"deallocate takes a torch.Tensor; got None"),
    (lambda: poolscope.dump_snapshot(None), TypeError, r"path must be a str or os.PathLike; got None"),
    (lambda: poolscope.unpool(torch.zeros(1)), TypeError, r"unpool takes an nn.Module"),
    (lambda: assert_no_leaks(allow_escapes=-2), ValueError, r"allow_escapes must be an int >= 0; got -2"),
    (lambda: assert_no_leaks(threshold="x"), ValueError, r"threshold must be"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_is_named_and_leaves_nothing_behind(call, error, match):
    before = poolscope.get_pool().stats().bytes_in_use
    with pytest.raises(error, match=match) as raised:
        call()
    assert isinstance(raised.value, poolscope.PoolscopeError)
    assert open_scopes() == 0
    assert poolscope.get_pool().stats().bytes_in_use == before


HUGE = 1 << 62


def native():
    return engine_for(torch.device("cpu")).module


@pytest.mark.pools
@pytest.mark.parametrize(
    "call",
    [lambda: torch.empty(HUGE, dtype=torch.uint8), lambda: torch.zeros(HUGE // 8), lambda: torch.full((HUGE // 4,), 1.0)],
)
def test_impossible_allocation_raises_pytorchs_own_error(call):
    with pytest.raises(RuntimeError) as plain:
        call()
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        with pytest.raises(type(plain.value)) as pooled:
            call()
    assert str(pooled.value) == str(plain.value)
    stats = pool.stats()
    assert stats.bytes_reserved == 0 and stats.blocks_in_use == 0 and stats.segments == 0


# --- out of memory ---------------------------------------------------------------------------


@pytest.mark.pools
def test_growth_failure_frees_the_cache_then_falls_back_to_the_ordinary_allocator():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool) as scope:
        warm = torch.ones(MiB)  # a cached block too small for what follows
        del warm
        native()._test.fail_growth(True)
        try:
            x = torch.full((2 * MiB,), 3.0)
        finally:
            native()._test.fail_growth(False)
    assert torch.all(x == 3.0)
    stats = pool.stats()
    assert stats.fallbacks == 1 and scope.stats.fallbacks == 1 and stats.blocks_in_use == 0
    assert stats.bytes_cached == 0 and stats.segments == 0  # the pool gave back its cache before giving up
    del x


@pytest.mark.pools
def test_hard_limit_gives_back_the_cache_first_then_falls_back():
    pool = poolscope.TensorPool("cpu", max_bytes="12MiB")
    with poolscope.pool_scope(pool=pool):
        a = torch.zeros(MiB)  # 4 MiB lent
        b = torch.zeros(MiB + 1000)  # 5 MiB lent
        del b  # 5 MiB cached
        c = torch.zeros(2 * MiB)  # 8 MiB: 4 + 5 + 8 > 12, fits once the cache is given back
        assert pool.stats().evictions == 1 and pool.stats().fallbacks == 0
        d = torch.zeros(MiB)  # 4 + 8 + 4 > 12: nothing to give back, ordinary allocator
    stats = pool.stats()
    assert stats.fallbacks == 1 and stats.bytes_reserved <= 12 * MiB
    assert stats.blocks_in_use == 2
    assert not d.any() and not c.any() and not a.any()
    del a, c, d
    assert pool.stats().bytes_in_use == 0


# --- faults at random points -----------------------------------------------------------------


class Model(torch.nn.Module):
    @poolscope.pooled_forward
    def forward(self, x):
        return torch.zeros(MiB) + x


class Fault(Exception):
    pass


def _workload(pool: poolscope.TensorPool, fail_at: int, grow_fails: set[int]) -> torch.Tensor:
    """Nested scopes, a decorated forward and op outputs; step ``fail_at`` raises, steps in ``grow_fails``
    run while pool growth fails."""
    steps = [
        lambda env: env.update(a=torch.ones(MiB)),
        lambda env: env.update(b=env["a"] * 2),
        lambda env: env.update(kept=torch.randn(MiB)),
        lambda env: env.pop("b"),
        lambda env: env.update(m=Model()(torch.ones(1))),
        lambda env: env.update(c=torch.zeros(3 * MiB)),
        lambda env: env.update(d=env["c"][: MiB] + env["kept"]),
        lambda env: env.pop("a"),
    ]
    env: dict[str, torch.Tensor] = {}
    with poolscope.pool_scope(pool=pool, name="outer"):
        with poolscope.pool_scope(pool=pool, threshold=0):
            for i, step in enumerate(steps):
                if i == fail_at:
                    raise Fault(i)
                native()._test.fail_growth(i in grow_fails)
                try:
                    step(env)
                finally:
                    native()._test.fail_growth(False)
    return env["kept"]


@pytest.mark.pools
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fail_at=st.integers(0, 9), grow_fails=st.sets(st.integers(0, 7)), warm=st.booleans())
def test_faults_and_failed_growth_at_any_point_lose_nothing(fail_at, grow_fails, warm):
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        survivor = torch.full((MiB,), 7.0)
    if warm:
        _workload(pool, fail_at=-1, grow_fails=set())  # a warm cache, and a cold one
    torch.manual_seed(0)
    expected = torch.randn(MiB)
    torch.manual_seed(0)
    try:
        kept = _workload(pool, fail_at, grow_fails)
        assert torch.equal(kept, expected)
        del kept
    except Fault:
        pass
    gc.collect()
    assert open_scopes() == 0
    stats = pool.stats()
    assert stats.blocks_in_use == 1, "a block was lost or counted twice"
    assert torch.all(survivor == 7.0)
    # The pool still works, and never lends the survivor's block.
    with poolscope.pool_scope(pool=pool):
        fresh = torch.zeros(MiB)
    assert fresh.data_ptr() != survivor.data_ptr() and torch.all(survivor == 7.0)
    del survivor, fresh
    assert pool.stats().bytes_in_use == 0


# --- threads ---------------------------------------------------------------------------------


@pytest.mark.pools
def test_eight_threads_with_cross_thread_handoffs():
    pool = poolscope.TensorPool("cpu")
    handoff: queue.Queue = queue.Queue(maxsize=64)
    errors: list[BaseException] = []
    per_thread = int(os.environ.get("POOLSCOPE_THREAD_OPS", "1500"))
    done = threading.Barrier(8)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        mine: list[tuple[torch.Tensor, float]] = []
        try:
            with poolscope.pool_scope(pool=pool, threshold=0):
                for i in range(per_thread):
                    value = float(seed * 100000 + i)
                    t = torch.full((rng.choice([1024, 4096, 70000, 262144]),), value)
                    if rng.random() < 0.3:
                        handoff.put((t, value), timeout=30)
                    else:
                        mine.append((t, value))
                    if rng.random() < 0.5 and mine:
                        t2, v2 = mine.pop(rng.randrange(len(mine)))
                        assert bool(torch.all(t2 == v2)), "a kept tensor changed"
                    try:
                        other, v = handoff.get_nowait()
                        assert bool(torch.all(other == v)), "a handed-over tensor changed"
                        del other
                    except queue.Empty:
                        pass
                for t2, v2 in mine:
                    assert bool(torch.all(t2 == v2))
                mine.clear()
            done.wait(timeout=120)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            done.abort()

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "deadlock: a thread did not finish"
    assert not errors, errors
    while not handoff.empty():
        t, v = handoff.get_nowait()
        assert bool(torch.all(t == v))
        del t
    gc.collect()
    stats = pool.stats()
    assert stats.bytes_in_use == 0 and stats.blocks_in_use == 0
    assert stats.hits + stats.misses >= 8 * per_thread


def test_garbage_collections_that_free_and_allocate_pooled_memory_do_not_deadlock():
    # Collections start at arbitrary points (inside tensor creation, too); their
    # callbacks and the finalizers they run may free and allocate pooled memory.
    seen = []

    def watch(phase, info):
        if phase == "start":
            with poolscope.pool_scope(threshold=0):
                seen.append(torch.ones(2048).sum().item())

    gc.callbacks.append(watch)
    old = gc.get_threshold()
    gc.set_threshold(1, 1, 1)  # collect as often as possible
    try:
        with poolscope.pool_scope(threshold=0):
            for _ in range(300):
                cycle = [torch.zeros(8192)]
                cycle.append(cycle)
                del cycle
    finally:
        gc.set_threshold(*old)
        gc.callbacks.remove(watch)
    gc.collect()
    assert seen and all(v == 2048 for v in seen)


# --- long runs -------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _soak(steps: int) -> dict:
    pool = poolscope.TensorPool("cpu", max_cached_bytes="64MiB")
    rng = random.Random(0)
    sizes = [MiB // 4 + rng.randrange(0, 4 * MiB) for _ in range(64)]
    rss: list[int] = []
    bookkeeping: list[tuple[int, ...]] = []
    for i in range(steps):
        with poolscope.pool_scope(pool=pool, threshold=0):
            a = torch.empty(sizes[i % 64], dtype=torch.uint8).fill_(1)
            b = torch.zeros(sizes[(i * 7) % 64] // 4)
            c = b + 1 if i % 2 else b
            del a, b, c
        if i % max(1, steps // 20) == 0:
            gc.collect()
            rss.append(_rss_bytes())
            s = pool.stats()
            bookkeeping.append((s.blocks_in_use, s.blocks_cached, s.segments))
        assert pool.stats().bytes_cached <= 64 * MiB
    return {"rss": rss, "bookkeeping": bookkeeping, "stats": pool.stats()}


def _check_soak(result: dict) -> None:
    rss = result["rss"]
    warm = rss[len(rss) // 4]
    assert max(rss[len(rss) // 4 :]) - warm < 64 * MiB, f"RSS grew: {[r // MiB for r in rss]} MiB"
    for live, cached, segments in result["bookkeeping"]:
        assert live == 0 and cached <= segments <= 64  # each segment coalesced into few free blocks
    assert result["stats"].bytes_in_use == 0


@pytest.mark.pools
def test_soak_short():
    _check_soak(_soak(int(os.environ.get("POOLSCOPE_SOAK_STEPS", "4000"))))


@pytest.mark.soak
def test_soak_long():
    _check_soak(_soak(100_000))
