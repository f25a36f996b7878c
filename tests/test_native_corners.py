"""The native engine in its corners: the lock and Python, page sizes, sizes near the top of size_t,
pool caps, thread exit, out of memory mid-lend, foreign exceptions. Each test is named after the
behaviour that, missing, was a silent corruption or a hang (see docs/guarantees.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import poolscope
from poolscope.engines import engine_for
from helpers import MiB, ROOT

pytestmark = pytest.mark.pools
SIZE_MAX = (1 << 64) - 1


def native():
    return engine_for(torch.device("cpu")).module


def test_scope_figures_are_read_without_holding_the_lock_while_python_runs(tmp_path):
    # Making the figures' dict can collect garbage; here it frees a pooled tensor, whose deleter
    # takes the engine's lock: had the dict been made under that lock, this thread would hang.
    program = tmp_path / "cycle.py"
    program.write_text(textwrap.dedent("""
        import gc, torch, poolscope

        class Holder:
            pass

        with poolscope.pool_scope() as s:
            gc.disable()
            h = Holder()
            h.self = h
            h.t = torch.empty(1 << 20)  # a pooled tensor only a reference cycle keeps alive
            del h
            stats = s._backend.stats
            keep = [{} for _ in range(10000)]  # the dict free list is empty: the next dict is allocated
            gc.set_threshold(1)
            gc.enable()
            figures = stats()
            gc.set_threshold(700)
        print("routed", figures.allocations_routed, "in use", poolscope.get_pool().stats().bytes_in_use)
    """))
    out = subprocess.run([sys.executable, str(program)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["routed", "1", "in", "use", "0"]


@pytest.mark.parametrize("page", [16 << 10, 64 << 10])
def test_dropping_pages_never_touches_a_live_neighbour_under_larger_kernel_pages(page):
    pool = poolscope.TensorPool("cpu")
    refused = native()._test.refused_drops()
    native()._test.simulate_page_size(page)
    try:
        with poolscope.pool_scope(pool=pool):
            torch.empty(8 * MiB, dtype=torch.uint8)  # dies at once: one free 8 MiB segment to carve
            # Three blocks of it, odd sizes, so that no block starts on a large-page boundary.
            left = torch.full((MiB + 4096 + 512,), 1, dtype=torch.uint8)
            middle = torch.full((3 * MiB + 1536,), 2, dtype=torch.uint8)
            right = torch.full((MiB + 2560,), 3, dtype=torch.uint8)
        segments = pool.segments()
        assert len(segments) == 1, "the test needs the three blocks in one segment"
        del middle
        before = pool.stats().bytes_released
        pool.empty_cache()  # the free middle block's pages go back; its neighbours stay lent
        released = pool.stats().bytes_released - before
    finally:
        native()._test.simulate_page_size(0)
    assert torch.all(left == 1) and torch.all(right == 3), "a live neighbour's bytes were zeroed"
    assert native()._test.refused_drops() == refused, "the kernel refused a range: nothing was given back"
    assert released > 0
    del left, right


def test_the_page_size_is_the_kernels():
    import mmap

    assert native()._test.page_size() == mmap.PAGESIZE


@pytest.mark.parametrize("nbytes", [SIZE_MAX, SIZE_MAX - 1, SIZE_MAX - 511, SIZE_MAX - 512, (1 << 63) + 1, (1 << 62) + 1])
def test_sizes_near_the_top_of_size_t_are_refused_not_lent_as_empty_blocks(nbytes):
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        error = native()._test.try_allocate(nbytes)
        a = torch.empty(2 * MiB, dtype=torch.uint8)
        b = torch.empty(2 * MiB, dtype=torch.uint8)
    assert error is not None, "an impossible allocation succeeded"
    assert a.data_ptr() != b.data_ptr()
    stats = pool.stats()
    assert stats.blocks_in_use == 2 and stats.bytes_in_use == 4 * MiB
    del a, b
    assert pool.stats().blocks_in_use == 0


def test_a_pools_max_bytes_bounds_everything_it_maps():
    cap = 3 * MiB
    pool = poolscope.TensorPool("cpu", max_bytes=cap)
    with poolscope.pool_scope(pool=pool):
        kept = [torch.empty(n, dtype=torch.uint8) for n in (MiB, 3 * MiB // 2, MiB)]
        stats = pool.stats()
        mapped = sum(segment["total_size"] for segment in pool.segments())
    assert stats.bytes_in_use <= cap and mapped <= cap, (stats, mapped)
    assert stats.bytes_in_use + stats.bytes_cached <= cap
    assert pool.stats().fallbacks >= 1  # what did not fit went to the ordinary allocator
    del kept


def test_a_size_near_2_to_the_63_is_refused_by_the_scopes_max_bytes_and_keeps_the_cache():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        warm = torch.empty(3 * MiB, dtype=torch.uint8)
    del warm
    cached = pool.stats().bytes_cached
    assert cached >= 3 * MiB
    with pytest.raises(poolscope.ScopeLimitError, match="max_bytes=4194304"):
        with poolscope.pool_scope(pool=pool, max_bytes="4MiB"):
            torch.empty((1 << 63) - 1, dtype=torch.uint8)
    assert pool.stats().bytes_cached == cached


def test_an_impossible_request_inside_a_scope_keeps_the_pools_cache():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        warm = torch.empty(3 * MiB, dtype=torch.uint8)
    del warm
    cached = pool.stats().bytes_cached
    with poolscope.pool_scope(pool=pool):
        with pytest.raises(RuntimeError):
            torch.empty(1 << 50, dtype=torch.uint8)  # a PiB: more than this machine could ever hold
    assert pool.stats().bytes_cached == cached


def test_an_allocation_after_the_threads_scope_stack_died_is_not_pooled():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):  # installs the allocator
        pass
    assert native()._test.allocate_at_thread_exit(pool._backend, 0) is False
    assert pool.stats().blocks_in_use == 0


def test_a_thread_in_a_scope_is_routed_while_other_threads_come_and_go_and_die_in_theirs():
    # Outside every scope the allocator forwards without reading its thread-local while no thread
    # is inside one: the count behind that must never read zero for a thread that is.
    pool = poolscope.TensorPool("cpu")
    stop = threading.Event()

    def come_and_go():
        while not stop.is_set():
            with poolscope.pool_scope(pool=pool):
                torch.empty(MiB, dtype=torch.uint8)

    def die_inside():
        poolscope.pool_scope(pool=pool).__enter__()  # never exited: the thread ends inside it

    others = [threading.Thread(target=come_and_go) for _ in range(3)]
    for t in others:
        t.start()
    try:
        with poolscope.pool_scope(pool=pool) as scope:
            for i in range(300):
                torch.empty(MiB, dtype=torch.uint8)
                if i % 50 == 0:
                    t = threading.Thread(target=die_inside)
                    t.start()
                    t.join()
    finally:
        stop.set()
        for t in others:
            t.join()
    assert scope.stats.allocations_routed == 300
    outside = torch.empty(MiB, dtype=torch.uint8)  # no scope anywhere now: not pooled
    assert pool.stats().blocks_in_use == 0
    del outside


def test_running_out_of_memory_mid_lend_puts_the_block_back():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool) as scope:
        warm = torch.empty(2 * MiB, dtype=torch.uint8)
        del warm  # held by this thread for its next lend, which cannot fail (it allocates nothing)
        assert pool.stats().blocks_cached == 1  # reading the figures puts it back into the pool
        native()._test.fail_next_register()  # so the lend takes it from there, and fails after
        with pytest.raises(RuntimeError):
            torch.empty(2 * MiB, dtype=torch.uint8)
        stats = pool.stats()
        assert stats.blocks_in_use == 0 and stats.bytes_in_use == 0 and stats.segments == 1
        again = torch.empty(2 * MiB, dtype=torch.uint8)  # the same block, lent again
    assert pool.stats().hits == 1 and pool.stats().segments == 1
    assert scope.stats.bytes_in_use == 2 * MiB
    del again
    assert pool.stats().blocks_in_use == 0


def test_a_foreign_exception_from_the_replaced_allocator_does_not_block_later_growth():
    pool = poolscope.TensorPool("cpu", max_bytes="8MiB")
    with poolscope.pool_scope(pool=pool):
        native()._test.fail_growth(2)
        try:
            x = torch.empty(2 * MiB, dtype=torch.uint8)  # the ordinary allocator serves it
        finally:
            native()._test.fail_growth(0)
        ys = [torch.empty(2 * MiB, dtype=torch.uint8) for _ in range(3)]  # 6 of the 8 MiB: pooled
    stats = pool.stats()
    assert stats.fallbacks == 1 and stats.blocks_in_use == 3, stats
    del x, ys


FAIL_NEW_CHILD = textwrap.dedent("""
    import ctypes, gc, sys, torch, poolscope
    lib = ctypes.CDLL(None)  # the preloaded fail_new library is in the global scope
    arm, calls = lib.poolscope_fail_new_arm, lib.poolscope_fail_new_calls
    calls.restype = ctypes.c_long
    MiB = 1 << 20

    def consistent(pool, where):
        gc.collect()
        s = pool.stats()
        assert s.bytes_in_use == 0 and s.blocks_in_use == 0, (where, s)
        assert s.bytes_cached >= 0 and s.bytes_reserved == s.bytes_cached, (where, s)
        listed = sum(b["size"] for seg in pool.segments() for b in seg["blocks"])
        assert listed == sum(seg["total_size"] for seg in pool.segments()), where
        pool.empty_cache()  # a block lost from the free set would keep its segment
        s = pool.stats()
        assert s.segments == 0 and s.bytes_cached == 0, (where, s)

    # A lend at each of its allocations: every step before the pool changes, or none.
    for case, (cached, size) in {"split": (8 * MiB, 2 * MiB), "grow": (0, 3 * MiB), "whole": (2 * MiB, 2 * MiB)}.items():
        pool = poolscope.TensorPool("cpu")
        failed_somewhere = 0
        for n in range(1, 400):
            if cached:
                with poolscope.pool_scope(pool=pool):
                    torch.empty(cached, dtype=torch.uint8)
            with poolscope.pool_scope(pool=pool):
                arm(n)
                try:
                    x = torch.empty(size, dtype=torch.uint8)
                    x.fill_(1)
                    ok = True
                except (RuntimeError, MemoryError):
                    ok = False
                finally:
                    made = calls()
                    arm(0)
                x = None
            failed_somewhere += not ok
            consistent(pool, (case, n))
            if made < n:  # the n-th allocation never came: every one of them was tried
                break
        print(case, n, failed_somewhere)

    # A free at each allocation it might make: a free runs in a deleter and must not fail.
    pool = poolscope.TensorPool("cpu", max_cached_bytes="4MiB")
    for n in range(1, 60):
        with poolscope.pool_scope(pool=pool):
            with poolscope.pool_scope(pool=pool):
                xs = [torch.empty(3 * MiB, dtype=torch.uint8) for _ in range(3)]
        arm(n)
        del xs  # frees: scopes' figures, merges, the cap's release
        made = calls()
        arm(0)
        consistent(pool, ("free", n))
    print("free", made)
""")


def test_running_out_of_memory_at_any_allocation_of_a_lend_or_a_free_loses_nothing(tmp_path):
    # Every `operator new` of the engine in a lend fails in turn (a preloaded replacement counts them): the
    # pool stays consistent and gives all its memory back. A free must never fail (it runs in a
    # deleter: std::terminate): what it may allocate (releasing past max_cached_bytes) is skipped
    # when memory runs out, and the cap holds again at the next free.
    if os.environ.get("POOLSCOPE_SANITIZER"):
        pytest.skip("the sanitizer's runtime replaces operator new itself and must come first in LD_PRELOAD")
    library = tmp_path / "libfail_new.so"
    source = ROOT / "tests" / "tools" / "fail_new.cpp"
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the failing operator new")
    build = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-std=c++17", "-o", str(library), str(source), "-ldl"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", FAIL_NEW_CHILD], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LD_PRELOAD": str(library)})
    assert out.returncode == 0, out.stderr[-3000:]
    results = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    # A hit (a cached block lent whole or split) allocates nothing at all: the first armed
    # allocation never came, so there was nothing to fail.
    for case in ("split", "whole"):
        assert list(map(int, results[case])) == [1, 0], (case, results[case])
    tried, failures = map(int, results["grow"])
    assert failures >= 1 and tried > failures, ("grow", tried, failures)  # some allocations failed; the lend ran to the end
    # The frees' allocations (the cap's list of blocks to release) each failed in turn, and no free failed.
    assert 0 < int(results["free"][0]) < 59


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_two_threads_lending_freeing_each_others_blocks_exiting_and_releasing_never_alias(seed):
    # Lends, frees of each other's blocks, blocks alive past their scope's exit, out-of-order
    # exits and the pool's releases, on two threads at once (and the idle releaser beside them):
    # each buffer's serial at both ends survives until its free, and everything comes back.
    pool = poolscope.TensorPool("cpu", release_idle_s=0.001)
    with poolscope.pool_scope(pool=pool):  # installs
        pass
    checks = native()._test.stress(pool._backend, 2, 20_000, seed)
    assert checks > 10_000
    stats = pool.stats()
    assert stats.bytes_in_use == 0 and stats.blocks_in_use == 0, stats
    assert stats.hits > 1000 and stats.releases > 0, stats
    # A page drop the releaser had in flight (blocks out of the pool until it is done) may settle
    # after an empty_cache: everything is back once it has.
    deadline = time.monotonic() + 10
    while True:
        pool.empty_cache()
        if pool.stats().segments == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert pool.stats().segments == 0 and pool.stats().bytes_reserved == 0
