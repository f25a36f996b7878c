"""Scope semantics: nesting, out-of-order and cross-thread exits, threads, generators, asyncio, fork, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
import torch

import poolscope
from conftest import open_scopes
from helpers import MiB, run_python

pytestmark = pytest.mark.pools



def test_nested_scopes_count_toward_their_parents():
    with poolscope.pool_scope() as outer:
        a = torch.zeros(MiB)
        with poolscope.pool_scope() as inner:
            b = torch.zeros(2 * MiB)
            assert inner.stats.bytes_in_use == 8 * MiB
            assert outer.stats.bytes_in_use == 12 * MiB
        del b
        assert outer.stats.bytes_in_use == 4 * MiB
    assert inner.stats.escaped == 1 and inner.stats.allocations_routed == 1
    assert outer.stats.allocations_routed == 2 and outer.stats.peak_bytes_in_use == 12 * MiB
    del a


def test_sibling_scopes_have_independent_figures():
    with poolscope.pool_scope() as parent:
        with poolscope.pool_scope() as first:
            x = torch.zeros(4 * MiB)
        with poolscope.pool_scope() as second:
            y = torch.zeros(MiB)
        del x, y
    assert first.stats.peak_bytes_in_use == 16 * MiB
    assert second.stats.peak_bytes_in_use == 4 * MiB
    assert parent.stats.peak_bytes_in_use == 20 * MiB


def test_reset_peak_restarts_from_what_is_alive():
    with poolscope.pool_scope() as scope:
        big = torch.zeros(8 * MiB)
        del big
        keep = torch.zeros(MiB)
        assert scope.stats.peak_bytes_in_use == 32 * MiB
        scope.reset_peak()
        assert scope.stats.peak_bytes_in_use == 4 * MiB
    del keep


def test_a_scope_cannot_be_entered_twice_at_once():
    scope = poolscope.pool_scope()
    with scope:
        with pytest.raises(poolscope.PoolscopeError, match="is already active"):
            scope.__enter__()
    with scope:  # and may be used again once exited
        pass


def test_generator_scope_closed_inside_the_callers_scope_leaves_the_caller_routing():
    def generate():
        with poolscope.pool_scope():
            yield torch.zeros(MiB)
            yield torch.zeros(MiB)

    gen = generate()
    first = next(gen)
    with poolscope.pool_scope() as caller:
        gen.close()  # exits the generator's scope, which is below the caller's on this thread
        x = torch.zeros(MiB)
    assert caller.stats.allocations_routed == 1
    assert open_scopes() == 0
    del first, x


def test_out_of_order_exits_leave_the_others_open():
    a, b, c = poolscope.pool_scope(), poolscope.pool_scope(), poolscope.pool_scope()
    a.__enter__()
    b.__enter__()
    c.__enter__()
    b.__exit__(None, None, None)
    x = torch.zeros(MiB)
    assert c.stats.allocations_routed == 1 and a.stats.allocations_routed == 1
    c.__exit__(None, None, None)
    y = torch.zeros(MiB)
    assert a.stats.allocations_routed == 2
    a.__exit__(None, None, None)
    assert open_scopes() == 0
    del x, y


def test_exit_from_another_thread_closes_the_scope_for_its_own_thread():
    # A generator's scope finalized in another thread ends there (tests/test_boundary.py).
    scope = poolscope.pool_scope()
    scope.__enter__()
    t = threading.Thread(target=scope.__exit__, args=(None, None, None))
    t.start()
    t.join()
    x = torch.zeros(MiB)
    assert scope.stats.allocations_routed == 0 and not scope.active  # its own thread: no longer routed
    assert open_scopes() == 0
    with pytest.raises(poolscope.PoolscopeError, match="is not active"):
        scope.__exit__(None, None, None)
    del x


def test_exit_without_enter_is_an_error():
    with pytest.raises(poolscope.PoolscopeError, match="is not active"):
        poolscope.pool_scope().__exit__(None, None, None)


def test_threads_each_in_their_own_scope_share_a_pool_safely(pool):
    errors = []

    def work(seed):
        try:
            with poolscope.pool_scope(pool=pool, threshold=0) as scope:
                for i in range(200):
                    x = torch.full((MiB // 4 + (i % 5) * 1000,), float(seed))
                    y = torch.full_like(x, float(seed + 1))
                    assert torch.all(x == seed) and torch.all(y == seed + 1)
                    del x, y
            assert scope.stats.allocations_routed >= 400
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert pool.stats().bytes_in_use == 0


def test_asyncio_tasks_share_their_threads_scopes_as_with_no_grad():
    # Documented semantics: scopes are thread-local, like torch.no_grad. A task
    # suspended inside a scope leaves it open for whatever else the loop runs.
    events = []

    async def holder(ready, resume):
        with torch.no_grad(), poolscope.pool_scope() as scope:
            ready.set()
            await resume.wait()
        events.append(("holder", scope.stats.allocations_routed))

    async def other(ready, resume):
        await ready.wait()
        x = torch.zeros(MiB)
        events.append(("other grad enabled", torch.is_grad_enabled()))
        resume.set()
        del x

    async def main():
        ready, resume = asyncio.Event(), asyncio.Event()
        await asyncio.gather(holder(ready, resume), other(ready, resume))

    asyncio.run(main())
    assert ("other grad enabled", False) in events  # torch.no_grad leaks the same way
    assert ("holder", 1) in events
    assert open_scopes() == 0


def test_signal_handler_that_allocates_while_scopes_exit_does_not_deadlock():
    if not hasattr(signal, "setitimer"):
        pytest.skip("needs setitimer")
    fired = []
    busy = []

    def handler(signum, frame):
        if busy:  # the timer fired again inside the handler
            return
        busy.append(1)
        with poolscope.pool_scope(threshold=0):
            fired.append(torch.ones(MiB).sum().item())
        busy.clear()

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        for _ in range(3000):
            with poolscope.pool_scope(threshold=0):
                x = torch.zeros(MiB)
                del x
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired and all(v == MiB for v in fired)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_a_working_allocator_while_another_thread_allocates():
    torch.set_num_threads(1)  # plain PyTorch children can hang in OpenMP otherwise
    pool = poolscope.get_pool("cpu")
    with poolscope.pool_scope():
        inherited = torch.full((MiB,), 3.0)
    stop = threading.Event()

    def churn():  # keeps the allocator's lock busy while we fork
        while not stop.is_set():
            with poolscope.pool_scope(threshold=0):
                torch.zeros(MiB) + 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        pids = []
        for _ in range(5):
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    with poolscope.pool_scope() as scope:
                        x = torch.ones(2 * MiB)
                    ok = bool(torch.all(x == 1)) and bool(torch.all(inherited == 3.0))
                    del x
                    code = 0 if ok and scope.stats.allocations_routed == 1 and pool.stats().blocks_in_use >= 1 else 2
                finally:
                    os._exit(code)
            pids.append(pid)
    finally:
        stop.set()
        t.join()
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert torch.all(inherited == 3.0)
    del inherited


ASYNC_EXCEPTIONS = r"""
import signal, torch, poolscope
from poolscope.engines import engine_for

class Boom(Exception):
    pass

# The handler raises only while the with-statement (and the engine's first load) runs, once per
# attempt: a Boom never lands in this harness's own bookkeeping, where nothing would catch it.
inside = False

def handler(signum, frame):
    global inside
    if inside:
        inside = False
        raise Boom()

booms = 0
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0003, 0.0003)
for i in range(6000):
    try:
        inside = True
        with poolscope.pool_scope(threshold=0):
            x = torch.zeros(1000)
        inside = False
    except Boom:
        booms += 1
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print(booms, engine_for(torch.device("cpu")).module._test.thread_depth())
"""


def test_asynchronous_exceptions_never_leave_a_scope_open():
    # A signal handler raising every 0.3 ms lands anywhere, entering and exiting included.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", ASYNC_EXCEPTIONS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    booms, still_open = map(int, out.stdout.split())
    assert booms > 100 and still_open == 0


FORK_STORM = r"""
import os, threading, time, torch, poolscope
torch.set_num_threads(1)  # plain PyTorch children can hang in OpenMP otherwise
pool = poolscope.TensorPool("cpu", release_idle_s=0.02)  # made before any scope, as at module level
stop = threading.Event()

def make_pools():  # no scope: each new pool wakes the releaser, which takes the engine's lock
    while not stop.is_set():
        poolscope.TensorPool("cpu", release_idle_s=0.01)

def churn():  # lends, frees, growth and releases in flight while the parent forks
    while not stop.is_set():
        with poolscope.pool_scope(pool=pool, threshold=0):
            x = torch.zeros(1 << (18 + int(time.monotonic() * 1000) % 3))
        del x
        pool.empty_cache()

def child():
    code = 1
    try:
        with poolscope.pool_scope(pool=pool):
            y = torch.ones(1 << 20)
        ok = bool(torch.all(y == 1))
        del y
        deadline = time.monotonic() + 10
        while pool.stats().bytes_cached and time.monotonic() < deadline:
            time.sleep(0.01)  # the child's own releaser gives the cache back by time
        code = 0 if ok and pool.stats().bytes_cached == 0 else 2
    finally:
        os._exit(code)

# What the threads and the children call runs once first: a torch function's first call
# registers a static destructor (glibc's atexit lock), and a child forked while another thread
# holds that lock hangs in plain PyTorch (Python 3.12 warns that fork with threads may deadlock).
torch.all(torch.ones(1) == 1)
torch.zeros(1)
hung = failed = 0
half = int(os.environ.get("POOLSCOPE_TEST_FORKS", "400")) // 2
for work in (make_pools, churn):  # forks before any scope in this process, then amid scopes
    stop.clear()
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    children = []
    for i in range(half):
        pid = os.fork()
        if pid == 0:
            child()
        children.append((pid, time.monotonic()))
        while len(children) >= 8 or (i == half - 1 and children):
            pid, started = children[0]
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                failed += os.waitstatus_to_exitcode(status) != 0
                children.pop(0)
            elif time.monotonic() - started > 30:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                hung += 1
                children.pop(0)
            else:
                time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join()
print(hung, failed)
"""

def test_four_hundred_forks_of_a_busy_pool_made_before_any_scope_neither_hang_nor_keep_memory():
    # Fork handlers are registered when the engine loads, not at the first scope: a fork while
    # another thread holds the lock, grows the pool or drops pages gives a working child, whose
    # own releaser gives back by time. (POOLSCOPE_TEST_FORKS: fewer under emulation.)
    out = run_python(FORK_STORM)
    assert out.returncode == 0, out.stderr[-3000:]
    hung, failed = map(int, out.stdout.split())
    assert (hung, failed) == (0, 0)
