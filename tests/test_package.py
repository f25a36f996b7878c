"""Packaging promises: a side-effect-free import, a typed public API, runnable examples."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import poolscope

ROOT = Path(__file__).resolve().parent.parent


def test_import_has_no_side_effects():
    code = (
        "import sys, torch, poolscope\n"
        "from poolscope import _engine, _pool\n"
        "from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as s\n"
        "assert not _pool._SHARED, 'a pool was created at import'\n"
        "assert _engine._cpu_engine is None, 'an engine was chosen at import'\n"
        "assert 'poolscope_native' not in sys.modules, 'the native engine was loaded at import'\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not s(), 'a mode was pushed at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.pools
def test_allocator_is_installed_by_the_first_scope_not_before():
    code = (
        "import torch, poolscope\n"
        "from poolscope._engine import engine_for\n"
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


def test_first_scope_does_not_import_dynamo():
    code = (
        "import sys, torch, poolscope\n"
        "with poolscope.pool_scope():\n"
        "    (torch.zeros(1 << 20) * 2).sum()\n"
        "assert 'torch._dynamo' not in sys.modules, 'the first scope imported torch._dynamo'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
