"""Memory back when the process goes idle: cached memory nothing used for ``release_idle_s`` goes
back with no call and no scope exit; loops whose steps come faster keep their working sets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import poolscope
from helpers import MiB



def _wait_for(condition, seconds: float) -> float:
    """Seconds until `condition()` held (polling), or fail after `seconds`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            raise AssertionError(f"not within {seconds} s")
        time.sleep(0.02)
    return time.monotonic() - started


def test_the_default_and_the_knobs():
    default = poolscope.TensorPool("cpu")
    assert default.release_idle_s == "auto"  # learns, from 10 s (tests/test_retention.py)
    stats = default.stats()
    assert stats.release_idle_s == 10.0 and stats.hold_idle_s == 10.0
    assert stats.learning == (default.engine == "native")  # the other engines keep the settings
    pool = poolscope.TensorPool("cpu", release_idle_s=0)
    assert pool.release_idle_s is None and pool.stats().release_idle_s is None
    pool.release_idle_s = 2.5
    assert pool.release_idle_s == 2.5 and pool.stats().release_idle_s == pytest.approx(2.5)
    with pytest.raises(poolscope.PoolscopeValueError, match=r"release_idle_s must be >= 0 seconds .*got -1"):
        poolscope.TensorPool("cpu", release_idle_s=-1)
    with pytest.raises(poolscope.PoolscopeValueError, match=r"release_idle_s must be a number of seconds, None or 'auto'; got '5s'"):
        poolscope.TensorPool("cpu", release_idle_s="5s")  # type: ignore[arg-type]
    with pytest.raises(poolscope.PoolscopeTypeError, match=r"release_idle_s must be a number of seconds >= 0, or None .*got \[5\]"):
        poolscope.TensorPool("cpu", release_idle_s=[5])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", "3.0"), ("0", "None"), ("none", "None"), ("inf", "None"), ("", "auto"), ("auto", "auto"), ("AUTO", "auto")],
)
def test_the_environment_variable(value, expected):
    code = "import poolscope; print(poolscope.TensorPool('cpu').release_idle_s)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "POOLSCOPE_RELEASE_IDLE_S": value}, timeout=120)
    assert out.stdout.strip() == expected, out.stderr


def test_a_bad_environment_variable_names_itself():
    out = subprocess.run([sys.executable, "-c", "import poolscope"], capture_output=True, text=True,
                         env={**os.environ, "POOLSCOPE_RELEASE_IDLE_S": "soon"}, timeout=120)
    assert out.returncode != 0 and "POOLSCOPE_RELEASE_IDLE_S='soon' is invalid" in out.stderr


@pytest.mark.pools
def test_cached_memory_goes_back_by_time_with_no_call_and_no_exit():
    pool = poolscope.TensorPool("cpu", release_idle_s=0.3)
    with poolscope.pool_scope(pool=pool):
        spike = torch.ones(16 * MiB)  # 64 MiB
    del spike
    assert pool.stats().bytes_cached >= 64 * MiB
    waited = _wait_for(lambda: pool.stats().bytes_cached == 0, 10)
    stats = pool.stats()
    assert waited >= 0.25, "released before it was idle for release_idle_s"
    assert stats.bytes_released_by_time >= 64 * MiB and stats.bytes_released_by_exits == 0
    assert stats.segments == 0
    assert "MiB by the idle clock" in poolscope.report() and "clocks 100 exits and 0.3 s (learning)" in poolscope.report()


@pytest.mark.pools
def test_a_loop_pausing_shorter_than_release_idle_s_keeps_its_working_set():
    pool = poolscope.TensorPool("cpu", release_idle_s=1.0)
    for _ in range(6):
        with poolscope.pool_scope(pool=pool):
            (torch.ones(4 * MiB) * 2).sum()
        time.sleep(0.4)
    stats = pool.stats()
    assert stats.bytes_released_by_time == 0 and stats.misses == 2 and stats.hits == 10, stats


@pytest.mark.pools
def test_memory_lent_to_a_live_tensor_is_never_released_by_time():
    pool = poolscope.TensorPool("cpu", release_idle_s=0.1)
    with poolscope.pool_scope(pool=pool):
        kept = torch.full((2 * MiB,), 5.0)
        torch.ones(2 * MiB)  # dies at once: cached, then released
    _wait_for(lambda: pool.stats().bytes_cached == 0, 10)
    assert pool.stats().bytes_in_use == 8 * MiB and torch.all(kept == 5.0)
    del kept


@pytest.mark.pools
def test_turning_it_on_later_releases_what_was_cached_before():
    pool = poolscope.TensorPool("cpu", release_idle_s=None)
    with poolscope.pool_scope(pool=pool):
        torch.ones(4 * MiB)
    time.sleep(0.3)
    assert pool.stats().bytes_cached >= 16 * MiB
    pool.release_idle_s = 0.1
    _wait_for(lambda: pool.stats().bytes_cached == 0, 10)


RSS_OVER_TIME = textwrap.dedent("""
    import json, os, sys, time, torch, poolscope

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

    torch.set_num_threads(1)
    before = rss_mib()
    with poolscope.pool_scope():
        spike = torch.ones(128 << 20)  # 512 MiB
    del spike
    after = rss_mib()
    samples, started = [], time.monotonic()
    while time.monotonic() - started < float(sys.argv[1]):
        samples.append((round(time.monotonic() - started, 2), rss_mib()))
        time.sleep(0.1)
    print(json.dumps({"before": before, "after": after, "samples": samples}))
""")


@pytest.mark.pools
def test_an_idle_process_gives_a_spike_back_in_rss_within_release_idle_s():
    import json

    env = {**os.environ, "POOLSCOPE_RELEASE_IDLE_S": "1"}
    out = subprocess.run([sys.executable, "-c", RSS_OVER_TIME, "4"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout)
    assert figures["after"] - figures["before"] > 400, figures["after"]  # the spike was resident
    back = [t for t, rss in figures["samples"] if rss - figures["before"] < 64]
    assert back, f"RSS never fell back: {figures['samples'][-3:]}"
    assert 0.8 <= back[0] <= 2.5, back[0]  # after release_idle_s, not before, and promptly


@pytest.mark.pools
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.skipif(os.environ.get("POOLSCOPE_SANITIZER") == "tsan",
                    reason="ThreadSanitizer does not support threads started after a multi-threaded fork")
def test_a_forked_child_gets_a_working_releaser():
    pool = poolscope.TensorPool("cpu", release_idle_s=0.2)
    with poolscope.pool_scope(pool=pool):
        torch.ones(MiB)  # starts the parent's releaser
    torch.set_num_threads(1)
    pid = os.fork()
    if pid == 0:  # child: the releaser thread did not come along; the next cached block starts one
        code = 1
        try:
            child = poolscope.TensorPool("cpu", release_idle_s=0.2)
            with poolscope.pool_scope(pool=child):
                torch.ones(4 * MiB)
            _wait_for(lambda: child.stats().bytes_cached == 0, 10)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def _releaser_switches() -> int:
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            if f.read().strip() == "poolscope-idle":
                with open(f"/proc/self/task/{task}/status") as f:
                    return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    raise AssertionError("no poolscope-idle thread")


@pytest.mark.pools
def test_the_releaser_sleeps_while_nothing_is_cached():
    pool = poolscope.TensorPool("cpu", release_idle_s=0.1)
    with poolscope.pool_scope(pool=pool):
        torch.ones(MiB)
    _wait_for(lambda: pool.stats().bytes_cached == 0, 10)
    from poolscope._pool import all_pools

    for other in all_pools():  # nothing cached anywhere: no deadline left to wake for
        other.empty_cache()
    time.sleep(0.3)
    before = _releaser_switches()
    time.sleep(1.0)
    assert _releaser_switches() - before <= 2, "the releaser woke up with nothing to do"


@pytest.mark.pools
def test_exiting_while_the_releaser_gives_memory_back_is_harmless():
    # The interpreter shuts down while the releaser may be in the middle of giving memory back.
    code = (
        "import sys, time, torch, poolscope\n"
        "pool = poolscope.TensorPool('cpu', release_idle_s=0.01)\n"
        "for _ in range(20):\n"
        "    with poolscope.pool_scope(pool=pool):\n"
        "        x = [torch.ones(1 << 20) for _ in range(8)]\n"
        "    del x\n"
        "time.sleep(float(sys.argv[1]))\n"
    )
    for delay in ("0", "0.005", "0.01", "0.012", "0.015", "0.02"):
        out = subprocess.run([sys.executable, "-c", code, delay], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and not out.stderr.strip(), (delay, out.returncode, out.stderr[-2000:])
