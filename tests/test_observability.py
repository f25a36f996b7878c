"""Per-scope report, memory snapshot, profiler ranges, logging, warnings, environment, main command, types."""

from __future__ import annotations

import logging
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.cuda import _memory_viz

import poolscope
from helpers import MiB, ROOT, run_python



@pytest.fixture(autouse=True)
def _fresh_report():
    poolscope.reset_report()
    yield
    poolscope.reset_report()


BLOCK_POOL = poolscope.TensorPool("cpu")


class Block(torch.nn.Module):
    @poolscope.pooled_forward(pool=BLOCK_POOL)
    def forward(self, x):
        scratch = torch.zeros(MiB)
        return x + scratch[:1]


@pytest.mark.pools
def test_report_accumulates_named_scopes_sorted_by_bytes():
    BLOCK_POOL.empty_cache()
    block = Block()
    for _ in range(3):
        block(torch.ones(1))
    with poolscope.pool_scope(name="big"):
        torch.ones(8 * MiB)
    with poolscope.pool_scope():  # unnamed: the "(unnamed)" row
        torch.ones(MiB)
    with poolscope.pool_scope():
        torch.ones(MiB)
    text = poolscope.report()
    # The table; under it, one line per pool that gave memory back (shared pools may have).
    lines = [line for line in text.splitlines() if not line.startswith("pool ")]
    assert all(re.match(r"pool cpu: .* MiB cached; released .* MiB by the exits clock, .* MiB by the idle clock; \d+ lends? faulted .* MiB "
                 r"of it in again; clocks \d+ exits and (\d+(\.\d+)? s|never) \((fixed|learning|learned; settings .*)\)", line)
               for line in text.splitlines() if line.startswith("pool "))
    assert lines[0].split() == [
        "scope", "calls", "routed", "MiB", "routed", "hit", "rate", "peak", "MiB", "live", "MiB", "escaped", "fallbacks",
        "alloc", "ms",
    ]
    big, block_row = lines[2].split(), lines[3].split()
    assert big[:4] == ["big", "1", "1", "32.0"]
    assert block_row[:4] == ["Block.forward", "3", "3", "12.0"]
    assert block_row[4] == "67%"  # first call misses, then hits
    assert block_row[5] == "4.0"  # peak MiB in use
    assert lines[4].split()[:4] == ["(unnamed)", "2", "2", "8.0"]
    assert len(lines) == 5
    poolscope.reset_report()
    assert len([line for line in poolscope.report().splitlines() if not line.startswith("pool ")]) == 2


@pytest.mark.pools
def test_scope_stats_peak_and_alloc_time():
    with poolscope.pool_scope() as scope:
        a = torch.zeros(MiB)
        b = torch.zeros(MiB)
        del a, b
        c = torch.zeros(MiB)
    stats = scope.stats
    assert stats.peak_bytes_in_use == 8 * MiB
    assert 0 < stats.alloc_seconds < 1
    del c


def test_idle_named_scope_warns_once():
    with pytest.warns(poolscope.PoolscopeWarning, match=r"scope 'idle' ran 100 times and pooled nothing") as record:
        for _ in range(100):
            with poolscope.pool_scope(name="idle"):
                torch.zeros(4)
    assert record[0].filename == __file__  # attributed to the user's line, not to poolscope or sys:1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with poolscope.pool_scope(name="idle"):
            torch.zeros(4)


def test_cap_below_threshold_warns():
    pool = poolscope.TensorPool("cpu", max_cached_bytes="512KiB")
    with pytest.warns(poolscope.PoolscopeWarning, match=r"max_cached_bytes=524288, below this scope's threshold=1048576"):
        with poolscope.pool_scope(pool=pool):
            torch.zeros(MiB)


@pytest.mark.pools
def test_logging_reports_growth_and_release(caplog):
    pool = poolscope.TensorPool("cpu", release_after=0)
    with caplog.at_level(logging.DEBUG, logger="poolscope"):
        with poolscope.pool_scope(pool=pool, threshold=0):
            torch.zeros(MiB)
    messages = [r.getMessage() for r in caplog.records if r.name == "poolscope"]
    assert any("pool cpu grew: 1 allocation(s) needed new memory" in m for m in messages)
    assert any("pool cpu released" in m for m in messages)


def test_profiler_shows_scope_ranges():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with poolscope.pool_scope(name="attention"):
            torch.zeros(MiB) + 1
        Block()(torch.ones(1))
    names = {e.name for e in prof.events()}
    assert "poolscope:attention" in names
    assert "poolscope:Block.forward" in names


def _profiled_allocations():
    with poolscope.pool_scope(name="profiled", enable_profiling=True):
        a = torch.zeros(2 * MiB)  # the allocating line the snapshot must name
        b = torch.ones(3 * MiB)
        del a
    return b


@pytest.mark.pools
def test_snapshot_renders_in_pytorch_memory_viz(tmp_path):
    keep = _profiled_allocations()
    snap = poolscope.snapshot()
    assert set(snap) >= {"segments", "device_traces"}
    segsum = _memory_viz.segsum(snap)  # checks that every segment's bytes add up
    assert "segments:" in segsum
    trace_text = _memory_viz.trace(snap)
    assert "cudaMalloc" in trace_text and "del " in trace_text
    for plot in (_memory_viz.trace_plot(snap), _memory_viz.segment_plot(snap)):
        assert "MemoryViz.js" in plot and "snapshot.pickle" in plot
    flame = _memory_viz.memory(snap, format_flamegraph=lambda lines: lines)
    assert "active_allocated" in flame and "test_observability.py" in flame
    cpu_trace = snap["device_traces"][-1]
    actions = [e["action"] for e in cpu_trace]
    assert actions.count("alloc") >= 2 and "free_completed" in actions
    ours = [e["frames"] for e in cpu_trace if e["action"] == "alloc" and e["frames"][0]["name"] == "_profiled_allocations"]
    assert len(ours) >= 2 and ours[-1][0]["filename"] == __file__
    live = [b for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"]
    assert any(b["requested_size"] == 12 * MiB for b in live)

    path = tmp_path / "pool.pickle"
    poolscope.dump_snapshot(path)
    assert path.read_bytes()[:2] == b"\x80\x04"  # the web viewer's unpickler reads protocols 2-4
    with open(path, "rb") as f:
        loaded = pickle.load(f)
    assert _memory_viz.segsum(loaded)
    out = subprocess.run(
        [sys.executable, "-m", "torch.cuda._memory_viz", "trace_plot", str(path), "-o", str(tmp_path / "p.html")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p.html").stat().st_size > 1000
    del keep


@pytest.mark.pools
def test_snapshot_without_profiling_has_state_but_no_timeline():
    pool = poolscope.TensorPool("cpu")
    with poolscope.pool_scope(pool=pool):
        kept = torch.zeros(MiB)
    assert pool.trace() == []
    segments = pool.segments()
    assert len(segments) == 1 and segments[0]["blocks"][0]["state"] == "active_allocated"
    assert _memory_viz.segsum({"segments": segments, "device_traces": []})
    del kept
    assert pool.segments()[0]["blocks"][0]["state"] == "inactive"


def test_dump_snapshot_rejects_bad_path():
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike; got 3"):
        poolscope.dump_snapshot(3)


@pytest.mark.pools
def test_seed_profiling_records_frames():
    pool = poolscope.get_global_memory_pool(enable_profiling=True)
    t = pool.allocate((MiB,), torch.float32, "cpu")
    snap = poolscope.snapshot()
    frames = [b["frames"] for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"]
    assert any(f and f[0]["name"] == "test_seed_profiling_records_frames" for f in frames)
    del t


@pytest.mark.pools
def test_environment_configuration():
    code = (
        "import torch, poolscope\n"
        "with poolscope.pool_scope() as s:\n"
        "    torch.zeros(1 << 20)\n"
        "pool = poolscope.get_pool()\n"
        "print(s.stats.allocations_routed, poolscope.pool_scope().threshold, pool.max_cached_bytes, "
        "pool.release_after, poolscope.engine())\n"
    )
    assert run_python(code).stdout.split() == ["1", str(MiB), "None", "auto", "native"]
    assert run_python(code, POOLSCOPE_DISABLE="1").stdout.split() == ["0", str(MiB), "None", "auto", "passthrough"]
    assert run_python(code, POOLSCOPE_ENGINE="passthrough").stdout.split()[-1] == "passthrough"
    assert run_python(code, POOLSCOPE_ENGINE="native").stdout.split()[-1] == "native"
    out = run_python(
        code, POOLSCOPE_THRESHOLD="8MiB", POOLSCOPE_MAX_CACHED="1GiB", POOLSCOPE_DISABLE="off", POOLSCOPE_RELEASE_AFTER="7"
    )
    assert out.stdout.split() == ["0", str(8 * MiB), str(1 << 30), "7", "native"]


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("POOLSCOPE_DISABLE", "maybe", r"POOLSCOPE_DISABLE='maybe' is not a switch; use one of \('1', 'true'"),
        ("POOLSCOPE_THRESHOLD", "lots", r"POOLSCOPE_THRESHOLD='lots' is invalid: threshold must be"),
        ("POOLSCOPE_THRESHOLD", "-3", r"POOLSCOPE_THRESHOLD='-3' is invalid"),
        ("POOLSCOPE_MAX_CACHED", "1 parsec", r"POOLSCOPE_MAX_CACHED='1 parsec' is invalid: max_cached_bytes must be"),
        ("POOLSCOPE_RELEASE_AFTER", "-1", r"POOLSCOPE_RELEASE_AFTER='-1' is invalid: release_after must be an int >= 0"),
        ("POOLSCOPE_ENGINE", "fast", r"POOLSCOPE_ENGINE='fast' is invalid: POOLSCOPE_ENGINE must be one of \('native', 'passthrough'\)"),
        ("POOLSCOPE_ENGINE", "dispatch", r"the dispatch-mode engine was removed in poolscope 0.2"),
    ],
)
def test_bad_environment_fails_at_import(name, value, match):
    import re

    out = run_python("import poolscope", **{name: value})
    assert out.returncode != 0
    assert re.search(match, out.stderr), out.stderr


@pytest.mark.pools
def test_main_command_runs_and_reports(tmp_path):
    snap = tmp_path / "snap.pickle"
    out = subprocess.run(
        [sys.executable, "-m", "poolscope", "--seq-len", "2048", "--repeats", "1", "--threshold", "256KiB",
         "--snapshot", str(snap)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "outputs bit-identical: yes" in out.stdout
    assert "dilated_attention" in out.stdout and "hit rate" in out.stdout
    assert "x" in out.stdout.split("->")[1]
    with open(snap, "rb") as f:
        assert _memory_viz.segsum(pickle.load(f))


def test_main_command_rejects_bad_flags():
    out = subprocess.run(
        [sys.executable, "-m", "poolscope", "--seq-len", "1000"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and "--seq-len must be a positive multiple of 1024; got 1000" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "poolscope", "--threshold", "huge"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and "threshold must be" in out.stderr


def test_mypy_is_clean(tmp_path):
    # The files this run imports (the installed package, under scripts/test), copied out of
    # site-packages (mypy refuses to check a folder there), with the checkout's mypy settings.
    import shutil

    shutil.copytree(Path(poolscope.__file__).parent, tmp_path / "poolscope", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(sys.modules["poolscope_pytest"].__file__, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "poolscope", "poolscope_pytest.py"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
