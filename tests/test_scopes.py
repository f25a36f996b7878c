"""Nesting, threads and processes."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import poolscope
from poolscope._torch_compat import dispatch_mode_stack

MiB = 1 << 20


def test_innermost_scope_governs_and_outer_is_restored():
    with poolscope.pool_scope(threshold="64MiB") as outer:
        torch.zeros(MiB)  # under the outer threshold
        with poolscope.pool_scope(threshold=0) as inner:
            torch.zeros(MiB)
            torch.zeros(8)
        torch.zeros(8 * MiB)  # outer again: still under 64 MiB
        big = torch.zeros(16 * MiB)
    assert inner.stats.allocations_routed == 2
    assert outer.stats.allocations_routed == 1
    assert outer.stats.escaped == 1
    del big


def test_nested_scopes_share_one_dispatch_mode():
    depth = len(dispatch_mode_stack())
    with poolscope.pool_scope():
        with poolscope.pool_scope():
            with poolscope.pool_scope():
                assert len(dispatch_mode_stack()) == depth + 1
    assert len(dispatch_mode_stack()) == depth


def test_inner_pool_scope_with_other_device_filter():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        with poolscope.pool_scope(threshold="1GiB"):
            torch.zeros(MiB)
    assert pool.stats().misses == 0


def test_scope_inside_another_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with poolscope.pool_scope() as outer:
        with Log():
            with poolscope.pool_scope() as inner:
                x = torch.ones(MiB) * 2
    assert inner.stats.allocations_routed == 1
    assert outer.stats.allocations_routed == 0
    assert torch.ops.aten.mul.Tensor in seen
    assert torch.all(x == 2)


def test_misnested_exit_leaves_no_mode_behind():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Other(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    depth = len(dispatch_mode_stack())
    scope = poolscope.pool_scope()
    scope.__enter__()
    other = Other()
    other.__enter__()
    scope.__exit__(None, None, None)
    assert dispatch_mode_stack()[-1] is other
    other.__exit__(None, None, None)
    assert len(dispatch_mode_stack()) == depth


def test_scope_routes_only_its_own_thread():
    pool = poolscope.TensorPool("cpu")
    started, done = threading.Event(), threading.Event()
    results = {}

    def other_thread():
        started.wait()
        results["t"] = torch.zeros(MiB)
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with poolscope.pool_scope(pool=pool) as scope:
        started.set()
        done.wait(timeout=30)
    t.join()
    assert scope.stats.allocations_routed == 0
    assert pool.stats().misses == 0


def test_threads_each_in_their_own_scope_share_a_pool_safely():
    pool = poolscope.TensorPool("cpu")
    errors = []

    def work(seed):
        try:
            with poolscope.pool_scope(pool=pool, threshold=0):
                for i in range(200):
                    x = torch.full((MiB // 4 + (i % 5) * 1000,), float(seed))
                    y = torch.full_like(x, float(seed + 1))
                    assert torch.all(x == seed) and torch.all(y == seed + 1)
                    del x, y
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    stats = pool.stats()
    assert stats.bytes_in_use == 0 and stats.hits + stats.misses == 4 * 200 * 2


def test_tensor_freed_in_another_thread_returns_its_block():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        box = [torch.ones(MiB)]
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    assert pool.stats().blocks_in_use == 0 and pool.stats().blocks_cached == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_gets_a_working_pool():
    torch.set_num_threads(1)  # plain PyTorch children can hang in OpenMP otherwise
    pool = poolscope.get_pool("cpu")
    with poolscope.pool_scope():
        inherited = torch.full((MiB,), 3.0)
    stop = threading.Event()

    def churn():  # keeps the pool's lock busy while we fork
        while not stop.is_set():
            with poolscope.pool_scope():
                torch.zeros(MiB)

    t = threading.Thread(target=churn)
    t.start()
    try:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                with poolscope.pool_scope() as scope:
                    x = torch.ones(2 * MiB)
                    ok = bool(torch.all(x == 1)) and bool(torch.all(inherited == 3.0))
                code = 0 if ok and scope.stats.allocations_routed == 1 and pool.stats().blocks_in_use >= 1 else 2
            finally:
                os._exit(code)
    finally:
        stop.set()
        t.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.all(inherited == 3.0)
    del inherited
