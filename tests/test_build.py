"""The native engine's build: cached per torch version, ABI and source; a clear fallback without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poolscope import _build

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    # The engine is picked as a user's process picks it, whatever engine this run forces.
    env = {**os.environ, "POOLSCOPE_ENGINE": "", "POOLSCOPE_DISABLE": "", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_the_cache_is_keyed_by_torch_version_abi_python_and_sources():
    name = _build.build_dir().name
    assert name.startswith(f"torch{torch.__version__}-abi")
    assert f"-py{sys.version_info.major}{sys.version_info.minor}-" in name


@pytest.mark.pools
def test_a_built_engine_is_imported_not_compiled_again():
    out = _python("import poolscope; print(poolscope.engine())")
    assert out.stdout.split() == ["native"]
    assert "compiling" not in out.stderr


def test_without_a_compiler_scopes_pass_through_and_say_why_once(tmp_path):
    code = (
        "import warnings, torch, poolscope\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    for _ in range(3):\n"
        "        with poolscope.pool_scope() as s:\n"
        "            x = torch.ones(1 << 20) * 2\n"
        "print(poolscope.engine(), s.stats.allocations_routed, bool(torch.all(x == 2)))\n"
        "print(sum('native engine is unavailable' in str(w.message) for w in seen))\n"
        "print(seen[0].filename)\n"
    )
    out = _python(code, CXX="/bin/false", POOLSCOPE_CACHE_DIR=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["passthrough", "0", "True"]
    assert lines[1] == "1"  # once
    assert lines[2] == "<string>"  # attributed to the user's code


def test_when_native_is_required_a_failed_build_is_an_error(tmp_path):
    code = (
        "import torch, poolscope\n"
        "try:\n"
        "    poolscope.engine()\n"
        "except poolscope.PoolscopeError as exc:\n"
        "    print('error:', exc)\n"
    )
    out = _python(code, CXX="/bin/false", POOLSCOPE_CACHE_DIR=str(tmp_path), POOLSCOPE_ENGINE="native")
    assert "error: POOLSCOPE_ENGINE=native, but the native engine is unavailable" in out.stdout, out.stderr[-2000:]
    assert "needs a C++ compiler" in out.stdout
