"""Packaging promises: a side-effect-free import, a typed public API, runnable examples."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import poolscope
from helpers import ROOT



def test_import_has_no_side_effects():
    code = (
        "import sys, torch, poolscope\n"
        "from poolscope import engines, _pool\n"
        "from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as s\n"
        "assert not _pool._SHARED, 'a pool was created at import'\n"
        "assert engines._cpu_engine is None, 'an engine was chosen at import'\n"
        "assert 'poolscope_native' not in sys.modules, 'the native engine was loaded at import'\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not s(), 'a mode was pushed at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.pools
def test_allocator_is_installed_by_the_first_scope_not_before():
    code = (
        "import torch, poolscope\n"
        "from poolscope.engines import engine_for\n"
        "poolscope.get_pool('cpu').stats()\n"
        "native = engine_for(torch.device('cpu')).module\n"
        "assert not native.installed(), 'a pool installed the allocator'\n"
        "with poolscope.pool_scope():\n"
        "    pass\n"
        "assert native.installed()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_public_api_is_explicit_typed_and_documented():
    assert (Path(poolscope.__file__).parent / "py.typed").exists()
    for name in poolscope.__all__:
        obj = getattr(poolscope, name)
        if name.startswith("__"):
            continue
        assert obj.__doc__, f"{name} has no docstring"
        if inspect.isfunction(obj):
            hints = obj.__annotations__
            assert "return" in hints, f"{name} has no return annotation"


@pytest.mark.parametrize(
    ("script", "args", "expected"),
    [
        ("longnet.py", ["--seq-len", "4096", "--repeats", "1"], ["bit-identical: True", "DilatedAttention.forward"]),
        ("inference_loop.py", ["--steps", "20"], ["tokens identical: True", "(flat)", "generate"]),
    ],
)
def test_examples_run_and_report(script, args, expected):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for text in expected:
        assert text in out


@pytest.mark.pools
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")))
def test_benchmarks_run_in_quick_mode(script, tmp_path):
    """A smoke run: the scripts work and write their results; the timings are not judged here."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| workload |" in out.stdout
    results = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert results


@pytest.mark.pools
def test_serving_benchmark_splits_faults_by_size_band_from_poolscope_at_several_thresholds(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--smoke", "--out", str(tmp_path),
         "--setups", "poolscope,poolscope@256KiB,poolscope@64KiB,plain"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert set(result["summary"]) == {"plain", "poolscope", "poolscope@256KiB", "poolscope@64KiB"}
    assert all(row["identical"] for row in result["summary"].values())
    assert [b["from"] for b in result["bands"]] == [
        "poolscope - poolscope@256KiB", "poolscope@256KiB - poolscope@64KiB", "poolscope@64KiB"]
    assert "| size band |" in out.stdout
    # The pool's resident pages (mincore over its segments) are within RSS, and only pools have them.
    records = {name: row["records"] for name, row in result["summary"].items()}
    assert all(r["pool_rss"] is None for r in records["plain"])
    assert max(r["pool_rss"] for r in records["poolscope@64KiB"]) > 0
    assert all(0 <= r["pool_rss"] < r["rss"] for r in records["poolscope@64KiB"])


def test_serving_benchmark_counts_rss_growth_from_the_peaks_of_the_stream_not_its_troughs():
    """A pool that gives memory back between bursts and takes it again is not growing; a heap that
    climbs a staircase is."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("serving_under_test", ROOT / "benchmarks" / "serving.py")
    serving = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serving)
    mib = 2**20
    streams = {
        "plain": [100 * mib + i * mib for i in range(40)],  # a staircase: 1 MiB a request
        "poolscope": [(300 if i % 4 == 3 else 200) * mib for i in range(40)],  # a sawtooth, flat peaks
        "poolscope+tcmalloc": [200 * mib + i * mib for i in range(40)],  # growing, the pool flat
    }
    pool_rss = {"plain": [None] * 40, "poolscope": [x - 150 * mib for x in streams["poolscope"]],
                "poolscope+tcmalloc": [100 * mib] * 40}
    results = {
        name: {"idle_rss": [rss[-1]], "records": [
            {"index": i, "time": 1.0, "faults": 0, "misses": 0, "rss": x, "pool_rss": pool_rss[name][i], "digest": "d",
             "gap": 0.0, "wall": 1.0, "after_wait": False} for i, x in enumerate(rss)]}
        for name, rss in streams.items()
    }
    args = argparse.Namespace(warmup=0, threads=1, idle=[60.0])
    summary = serving.summarize(args, results)
    assert summary["poolscope"]["rss_peaks_mib"] == [300.0] * 10
    assert summary["poolscope"]["rss_growth_second_half_mib"] == 0
    assert summary["plain"]["rss_peaks_mib"] == [103.0 + 4 * k for k in range(10)]
    assert summary["plain"]["rss_growth_second_half_mib"] == 16  # windows 6-10: 123 to 139 MiB
    # With the pool's resident pages known, growth is told apart: the rest's, not the pool's.
    assert "rss_outside_pool_peaks_mib" not in summary["plain"]
    assert summary["poolscope"]["rss_outside_pool_growth_second_half_mib"] == 0
    assert summary["poolscope"]["pool_rss_peaks_mib"] == [150.0] * 10
    assert summary["poolscope+tcmalloc"]["rss_growth_second_half_mib"] == 16
    assert summary["poolscope+tcmalloc"]["rss_outside_pool_growth_second_half_mib"] == 16
    assert summary["poolscope+tcmalloc"]["pool_rss_peaks_mib"] == [100.0] * 10


def test_serving_benchmark_names_an_unknown_setup():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--smoke", "--setups", "poolscope+tcmallok"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "unknown setup(s) tcmallok" in out.stderr and "poolscope+PEER" in out.stderr


@pytest.mark.pools
def test_allocation_benchmark_pairs_its_ratios_in_one_process(tmp_path):
    """``allocation.py --paired``: every ratio of issue 28 measured in one process, as a smoke run."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "allocation.py"), "--paired", "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| ratio |" in out.stdout
    result = json.loads((tmp_path / "allocation-paired-smoke.json").read_text())
    ratios = result["ratios"]
    assert len(ratios) == 3 + 3 * 3  # one thread's three; per two-thread loop: wall, each thread's rate, CPU
    assert all(r["median"] > 0 and r["q1"] <= r["median"] <= r["q3"] for r in ratios.values())
    two_threads = [r for name, r in ratios.items() if "waits at once" in r]
    assert len(two_threads) == 3 and all(r["waits at once"] >= 0 <= r["preemptions at once"] for r in two_threads)
    assert 0 <= result["stolen_share"] <= 1


def test_first_scope_does_not_import_dynamo():
    code = (
        "import sys, torch, poolscope\n"
        "with poolscope.pool_scope():\n"
        "    (torch.zeros(1 << 20) * 2).sum()\n"
        "assert 'torch._dynamo' not in sys.modules, 'the first scope imported torch._dynamo'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports_of(path: Path, module: str, is_package: bool) -> set[str]:
    """The poolscope modules ``module`` imports, at any level of its code (TYPE_CHECKING blocks aside)."""
    import ast

    tree = ast.parse(path.read_text())
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("poolscope"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith("poolscope"):
                    found.add(base)
                    found.update(f"{base}.{a.name}" for a in child.names)  # `from . import build`
            visit(child)

    visit(tree)
    return found


def test_the_package_has_no_import_circle():
    root = Path(poolscope.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = (path, rel.name == "__init__")
    graph = {m: {i for i in _imports_of(p, m, pkg) if i in modules and i != m} for m, (p, pkg) in modules.items()}
    # A submodule importing its own package's __init__ (or an ancestor's) is how Python loads it, not a circle.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                walk(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert "poolscope.engines.base" in graph and not any(d.startswith("poolscope.engines.") for d in graph["poolscope.engines.base"])
