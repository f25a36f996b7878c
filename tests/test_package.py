"""Packaging promises: a side-effect-free import, a typed public API, runnable examples."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import poolscope

ROOT = Path(__file__).resolve().parent.parent


def test_import_has_no_side_effects():
    code = (
        "import sys, torch, poolscope\n"
        "from poolscope import _pool\n"
        "from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as s\n"
        "assert not _pool._POOLS, 'a pool was created at import'\n"
        "assert not _pool._fork_hook_installed\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not s(), 'a mode was pushed at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_public_api_is_explicit_typed_and_documented():
    assert (ROOT / "poolscope" / "py.typed").exists()
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
