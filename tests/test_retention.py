"""Retention that follows the traffic (docs/memory.md): clocks left at "auto" learn the pauses the
traffic comes back after, hold at most 32x their settings, start over after a longer pause, and
give everything back at once when memory runs low. Time is the pools' injected clock
(``_test.set_clock``); the releaser's work at a deadline is ``_test.run_clocks``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poolscope
from helpers import MiB, assert_same, run_python
from poolscope.engines import engine_for

pytestmark = pytest.mark.pools

native_only = pytest.mark.skipif(
    engine_for(torch.device("cpu")).name != "native", reason="the native engine's clocks and pressure watch"
)


def hooks():
    return engine_for(torch.device("cpu")).module._test


@contextlib.contextmanager
def injected_clock(start: float = 1000.0):
    """The pools' clock reads what the test says; the releaser thread leaves the clocks alone."""
    now = [start]

    def advance(seconds: float) -> None:
        now[0] += seconds
        hooks().set_clock(now[0])
        hooks().run_clocks()

    hooks().set_clock(start)
    try:
        yield advance
    finally:
        hooks().set_clock(-1)


def request(pool: poolscope.TensorPool, mib: int = 8) -> torch.Tensor:
    with poolscope.pool_scope(pool=pool):
        x = torch.arange(mib * MiB // 4, dtype=torch.float32)
        return (x * 3).sum()


@native_only
def test_a_pause_the_traffic_came_back_after_is_held_the_next_time():
    pool = poolscope.TensorPool("cpu")
    with injected_clock() as advance:
        request(pool)
        advance(12)  # past the 10 s setting: released
        assert pool.stats().bytes_released_by_time > 0
        request(pool)  # faulted in again: the 12 s pause was the traffic's
        s = pool.stats()
        assert s.refaults >= 1 and s.bytes_refaulted > 0
        assert s.hold_idle_s == pytest.approx(24.0)  # twice the pause
        released, misses = s.bytes_released_by_time, s.misses
        for _ in range(5):  # the same pauses now cost nothing
            advance(12)
            request(pool)
        s = pool.stats()
        assert (s.bytes_released_by_time, s.misses) == (released, misses)
        advance(25)  # past the learned hold: the end of work gives everything back
        assert pool.stats().bytes_cached == 0 and pool.stats().segments == 0


@native_only
def test_a_fixed_clock_never_learns():
    pool = poolscope.TensorPool("cpu", release_idle_s=10, release_after=100)
    assert pool.release_idle_s == 10.0 and pool.release_after == 100 and not pool.stats().learning
    with injected_clock() as advance:
        for _ in range(4):
            request(pool)
            advance(12)
        s = pool.stats()
        assert s.bytes_refaulted == 3 * 16 * MiB  # what a fixed clock costs such traffic, counted
        assert s.hold_idle_s == 10.0 and s.bytes_cached == 0


@native_only
def test_the_hold_is_bounded_and_a_longer_pause_starts_over():
    pool = poolscope.TensorPool("cpu")
    with injected_clock() as advance:
        request(pool)
        for pause in (12, 30, 100, 250):  # each past the hold the one before taught: 24, 60, 200 s
            advance(pause)
            request(pool)
        assert pool.stats().hold_idle_s == 320.0  # 32 x 10 s at most, not 2 x 250 s
        advance(321)  # nothing holds longer than the bound
        assert pool.stats().bytes_cached == 0
        advance(100)  # a 421 s pause: the work had ended; the clock starts over
        request(pool)
        assert pool.stats().hold_idle_s == 10.0


@native_only
def test_a_shape_rarer_than_the_bound_does_not_end_the_work_of_the_traffic_around_it():
    # The idle clock learned 320 s; a 64 MiB request comes back 405 s after its last one while
    # 8 MiB requests keep coming every 15 s. Its memory went back at 320 s (it cannot be held
    # longer); its refault is a rare shape of ongoing traffic, not the end of work, so the clock
    # must not start over and release the steady requests' memory at their next 15 s pause.
    pool = poolscope.TensorPool("cpu")
    with injected_clock() as advance:
        request(pool)
        for pause in (12, 30, 100, 250):
            advance(pause)
            request(pool)
        assert pool.stats().hold_idle_s == 320.0
        request(pool, mib=64)
        for _ in range(27):
            advance(15)
            request(pool)
        released = pool.stats().bytes_released_by_time
        assert released >= 128 * MiB  # the rare request's memory went back at the bound
        refaults = pool.stats().refaults
        request(pool, mib=64)
        s = pool.stats()
        assert s.refaults > refaults and s.hold_idle_s == 320.0
        refaults = s.refaults
        for _ in range(4):
            advance(15)
            request(pool)
        s = pool.stats()
        assert (s.bytes_released_by_time, s.refaults) == (released, refaults)


@native_only
def test_the_exits_clock_learns_the_shapes_the_traffic_comes_back_for():
    # A rare large request every 102 exits: the 100-exit setting releases its memory each time.
    pool = poolscope.TensorPool("cpu", release_idle_s=None)

    def round_of_traffic() -> tuple[int, int]:
        before = pool.stats()
        request(pool, mib=32)
        for _ in range(101):
            request(pool, mib=2)
        after = pool.stats()
        return after.bytes_released_by_exits - before.bytes_released_by_exits, after.misses - before.misses

    released, _ = round_of_traffic()
    assert released > 0 and pool.stats().hold_after == 100
    for _ in range(2):
        round_of_traffic()
    assert pool.stats().hold_after > 102 and pool.stats().refaults > 0
    assert round_of_traffic() == (0, 0)  # learned: nothing released, nothing faulted in again


@native_only
@pytest.mark.parametrize("clock", ["exits", "time"])
def test_a_loop_reusing_the_front_of_an_idle_block_keeps_it_while_the_rest_goes(clock):
    # A one-off 64 MiB request, then a loop whose 2 x 4 MiB are carved from the front of its
    # block: when a clock finds the block idle, the loop's 8 MiB stay and the 56 MiB go. (A merged
    # block is as idle as its most idle part; releasing it whole made the loop miss and fault its
    # memory in again, and taught a learning clock a pause that was no pause.)
    exits = clock == "exits"
    pool = poolscope.TensorPool("cpu", release_after=3 if exits else 10**6, release_idle_s=None if exits else 10)
    with injected_clock() as advance:
        with poolscope.pool_scope(pool=pool):
            torch.empty(64 * MiB, dtype=torch.uint8).fill_(1)
        misses = pool.stats().misses
        for _ in range(8):
            advance(4)  # 32 s in all: the tail is idle past 10 s, the loop's part never is
            with poolscope.pool_scope(pool=pool):
                a = torch.empty(4 * MiB, dtype=torch.uint8).fill_(1)
                b = torch.empty(4 * MiB, dtype=torch.uint8).fill_(2)
                assert (int(a[-1]), int(b[0])) == (1, 2)  # apart (nothing else allocated here)
                del a, b
        s = pool.stats()
        released = s.bytes_released_by_exits if exits else s.bytes_released_by_time
        assert s.misses == misses and s.segments == 1
        assert released == 56 * MiB and s.bytes_cached == 8 * MiB
        assert s.refaults == 0 and s.bytes_refaulted == 0


@native_only
def test_setting_a_clock_forgets_what_was_learned():
    pool = poolscope.TensorPool("cpu")
    with injected_clock() as advance:
        request(pool)
        advance(40)
        request(pool)
        assert pool.stats().hold_idle_s == 80.0
        pool.release_idle_s = "auto"
        assert pool.stats().hold_idle_s == 80.0  # the same setting: nothing changed
        pool.release_after = 50
        assert pool.stats().hold_idle_s == 10.0 and pool.stats().hold_after == 50


@native_only
@settings(max_examples=int(os.environ.get("POOLSCOPE_TEST_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from([0, 1, 5, 12, 30, 90, 200, 400]), st.integers(1, 24),
                                st.booleans()), min_size=1, max_size=25),
       cap=st.sampled_from([None, 16 * MiB, 64 * MiB]))
def test_random_traffic_never_loses_a_lent_block_and_the_clocks_stay_in_bounds(steps, cap):
    pool = poolscope.TensorPool("cpu", max_cached_bytes=cap)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    with injected_clock() as advance:
        for pause, mib, keep in steps:
            advance(pause)
            with poolscope.pool_scope(pool=pool):
                out = torch.arange(mib * MiB // 4, dtype=torch.float32) * 2 + 1
            expected = torch.arange(mib * MiB // 4, dtype=torch.float32) * 2 + 1  # outside any scope
            assert_same(out, expected)
            if keep:  # a lent block living across pauses and releases
                kept.append((out, expected))
            s = pool.stats()
            assert 10.0 <= s.hold_idle_s <= 320.0 and 100 <= s.hold_after <= 3200
            assert cap is None or s.bytes_cached <= cap
            for held, want in kept:
                assert_same(held, want)  # never released under a live tensor
    kept.clear()
    pool.empty_cache()


# --- memory pressure ----------------------------------------------------------------------------


def fake_system(root: Path, *, total_kb: int, available_kb: int, cgroup: str = "", files: dict[str, str] = {}) -> None:
    """A /proc and /sys/fs/cgroup for the engine's pressure reading (``_test.set_memory_root``)."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/meminfo").write_text(f"MemTotal:       {total_kb} kB\nMemFree: 1 kB\nMemAvailable:   {available_kb} kB\n")
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@contextlib.contextmanager
def memory_root(root: Path):
    hooks().set_memory_root(str(root))
    try:
        yield
    finally:
        hooks().set_memory_root("")


@native_only
@pytest.mark.parametrize(
    ("cgroup", "files", "low", "source"),
    [
        ("", {}, False, "proc/meminfo"),
        ("0::/app\n", {"sys/fs/cgroup/app/memory.current": "960000000\n", "sys/fs/cgroup/app/memory.max": "max\n",
                       "sys/fs/cgroup/app/memory.high": "1000000000\n",
                       "sys/fs/cgroup/app/memory.stat": "anon 1\ninactive_file 50000000\nactive_file 2\n"},
         True, "app/memory.high"),  # 910 MB used of 1 GB: under a tenth left
        ("0::/app\n", {"sys/fs/cgroup/app/memory.current": "900000000\n", "sys/fs/cgroup/app/memory.max": "1000000000\n",
                       "sys/fs/cgroup/app/memory.stat": "inactive_file 200000000\n"},
         False, "app/memory.max"),  # the reclaimable file cache is not counted as used
        ("0::/app/worker\n", {"sys/fs/cgroup/app/worker/memory.current": "10\n",
                              "sys/fs/cgroup/app/memory.current": "950000000\n", "sys/fs/cgroup/app/memory.max": "1000000000\n"},
         True, "app/memory.max"),  # the limit sits on an ancestor
        ("4:memory:/job\n3:cpu:/job\n", {"sys/fs/cgroup/memory/job/memory.usage_in_bytes": "990000000\n",
                                         "sys/fs/cgroup/memory/job/memory.limit_in_bytes": "1000000000\n",
                                         "sys/fs/cgroup/memory/job/memory.stat": "inactive_file 5\ntotal_inactive_file 0\n"},
         True, "job/memory.limit_in_bytes"),  # cgroup v1
        ("4:memory:/job\n", {"sys/fs/cgroup/memory/job/memory.usage_in_bytes": "10\n",
                             "sys/fs/cgroup/memory/job/memory.limit_in_bytes": "9223372036854771712\n"},
         False, "proc/meminfo"),  # v1's "unlimited"
    ],
    ids=["meminfo", "v2-high", "v2-file-cache", "v2-ancestor", "v1", "v1-unlimited"],
)
def test_the_pressure_reading(tmp_path, cgroup, files, low, source):
    fake_system(tmp_path, total_kb=16_000_000, available_kb=8_000_000, cgroup=cgroup, files=files)
    with memory_root(tmp_path):
        reading = hooks().read_memory()
    assert reading["low"] is low
    assert reading["source"].endswith(source)
    fake_system(tmp_path, total_kb=16_000_000, available_kb=1_000_000)  # the system itself runs low
    with memory_root(tmp_path):
        assert hooks().read_memory() == {"low": True, "available": 1_024_000_000, "limit": 16_384_000_000,
                                         "source": str(tmp_path / "proc/meminfo")}


@native_only
def test_this_machine_reads_without_error():
    reading = hooks().read_memory()
    assert reading["limit"] > 0 and 0 <= reading["available"] <= reading["limit"], reading


@native_only
def test_low_memory_gives_every_cache_back_at_once_and_starts_the_clocks_over(tmp_path):
    pool = poolscope.TensorPool("cpu")
    with injected_clock() as advance:
        request(pool)
        advance(40)
        request(pool)
        assert pool.stats().hold_idle_s == 80.0 and pool.stats().bytes_cached > 0
        fake_system(tmp_path, total_kb=16_000_000, available_kb=8_000_000)
        with memory_root(tmp_path):
            time.sleep(1.5)  # the releaser reads once a second: plenty of memory, nothing changes
            assert pool.stats().bytes_cached > 0 and pool.stats().bytes_released_by_pressure == 0
            fake_system(tmp_path, total_kb=16_000_000, available_kb=500_000)
            deadline = time.monotonic() + 10
            while pool.stats().bytes_cached > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
        s = pool.stats()
        assert s.bytes_cached == 0 and s.bytes_released_by_pressure > 0
        assert s.hold_idle_s == 10.0  # what was learned is forgotten


def _own_memory_cgroup() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (folder / "memory.limit_in_bytes").exists():
                return folder
    return None


@native_only
def test_a_real_cgroup_at_its_limit_takes_the_cache_back():
    parent = _own_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable cgroup v1 memory hierarchy here (the reading itself is tested above)")
    group = parent / f"poolscope-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a cgroup here: {exc}")
    code = textwrap.dedent("""
        import sys, time, torch, poolscope
        pool = poolscope.TensorPool("cpu")
        torch.ones(4).sum()
        print("ready", flush=True)
        sys.stdin.readline()  # the parent moved this process into the cgroup and set its limit
        with poolscope.pool_scope(pool=pool):
            x = torch.ones(640 << 18)  # 640 MiB, resident
        del x  # cached now; the releaser may take it back before the next line runs (it reads at once)
        lent = pool.stats().peak_bytes_in_use
        deadline = time.monotonic() + 20
        while pool.stats().bytes_cached and time.monotonic() < deadline:
            time.sleep(0.05)
        print(lent >> 20, pool.stats().bytes_cached, pool.stats().bytes_released_by_pressure >> 20, flush=True)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        (group / "cgroup.procs").write_text(str(child.pid))
        # Room for the 640 MiB block and a little more: holding it cached leaves under a tenth free.
        usage = int((group / "memory.usage_in_bytes").read_text())
        (group / "memory.limit_in_bytes").write_text(str(usage + (700 << 20)))
        child.stdin.write("go\n")
        child.stdin.flush()
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        lent_mib, cached_after, by_pressure_mib = map(int, out.split())
        # All 640 MiB were lent, then cached, then given back by the pressure watch: none by a clock.
        assert lent_mib >= 640 and cached_after == 0 and by_pressure_mib >= 640, out
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# --- resident memory over time, in a child ------------------------------------------------------


@native_only
def test_resident_memory_follows_pauses_and_the_end_of_work():
    # Real resident memory, the pools' clock injected: a 256 MiB working set called every 30 s
    # (simulated) stays resident after the first pause taught the pool; when the calls stop, it is
    # back within the learned hold (60 s); a one-off burst in a fresh pool goes at the 10 s setting.
    code = textwrap.dedent("""
        import torch, poolscope
        from poolscope.engines import engine_for
        T = engine_for(torch.device("cpu")).module._test
        def rss():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) >> 10
        pool = poolscope.TensorPool("cpu")
        now = 1000.0
        def at(t):
            global now
            now = t; T.set_clock(now); T.run_clocks()
        def call():
            with poolscope.pool_scope(pool=pool):
                return float((torch.ones(64 << 20) * 2).sum())  # 2 x 256 MiB
        at(now); base = rss(); call(); print(rss() - base)
        faults = []
        for _ in range(6):
            at(now + 30)
            before = pool.stats().misses
            call()
            faults.append(pool.stats().misses - before)
            print(rss() - base)
        print(*faults)
        at(now + 59); print(rss() - base)
        at(now + 2); print(rss() - base)
        burst = poolscope.TensorPool("cpu")
        with poolscope.pool_scope(pool=burst):
            x = torch.ones(64 << 20)
        del x
        at(now + 11); print(rss() - base)
        T.set_clock(-1)
    """)
    out = run_python(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    first, *held = map(int, lines[:7])
    faults = list(map(int, lines[7].split()))
    before_hold, after_hold, after_burst = map(int, lines[8:11])
    assert first >= 500
    assert faults[0] > 0 and faults[1:] == [0] * 5  # one pause taught it; the rest cost nothing
    assert all(r >= 500 for r in held[1:])  # resident through every later pause
    assert before_hold >= 500  # 59 s after the last call: still within the learned 60 s
    assert after_hold < 50  # 61 s: back to the system
    assert after_burst < 50  # a fresh pool's one-off burst: back at its 10 s setting
