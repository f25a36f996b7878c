"""The native engine's build: cached per torch version, ABI and source; a clear fallback without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poolscope.engines import build as _build
from helpers import run_python



def test_the_cache_is_keyed_by_torch_version_abi_python_and_sources():
    name = _build.build_dir().name
    assert name.startswith(f"torch{torch.__version__}-abi")
    assert f"-py{sys.version_info.major}{sys.version_info.minor}-" in name


@pytest.mark.pools
def test_a_built_engine_is_imported_not_compiled_again():
    out = run_python("import poolscope; print(poolscope.engine())", as_user=True)
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
    out = run_python(code, as_user=True, CXX="/bin/false", POOLSCOPE_CACHE_DIR=str(tmp_path))
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
    out = run_python(code, as_user=True, CXX="/bin/false", POOLSCOPE_CACHE_DIR=str(tmp_path), POOLSCOPE_ENGINE="native")
    assert "error: POOLSCOPE_ENGINE=native, but the native engine is unavailable" in out.stdout, out.stderr[-2000:]
    assert "needs a working C++ compiler" in out.stdout


def _broken_copy(tmp_path: Path) -> Path:
    """A copy of the imported poolscope package whose engine sources are incomplete."""
    import shutil

    import poolscope

    site = tmp_path / "site"
    shutil.copytree(Path(poolscope.__file__).parent, site / "poolscope", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "poolscope" / "csrc" / "pool.cpp").unlink()
    return site


SCOPE_THEN_ENGINE = (
    "import warnings, torch, poolscope\n"
    "with warnings.catch_warnings(record=True) as seen:\n"
    "    warnings.simplefilter('always')\n"
    "    with poolscope.pool_scope() as s:\n"
    "        x = torch.ones(1 << 20) * 2\n"
    "print(poolscope.engine(), s.stats.allocations_routed, bool(torch.all(x == 2)))\n"
    "print([str(w.message) for w in seen])\n"
)


def test_missing_sources_become_one_warning_and_passthrough_scopes(tmp_path):
    site = _broken_copy(tmp_path)
    out = run_python(SCOPE_THEN_ENGINE, tmp_path, PYTHONPATH=str(site), POOLSCOPE_CACHE_DIR=str(tmp_path / "cache"), as_user=True)
    assert out.returncode == 0, out.stderr[-3000:]
    first, warned = out.stdout.splitlines()
    assert first.split() == ["passthrough", "0", "True"]
    assert "pool.cpp cannot be read" in warned and "pip install --force-reinstall" in warned
    assert "Traceback" not in out.stderr


def test_the_build_command_fails_with_the_cause_not_a_traceback(tmp_path):
    site = _broken_copy(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "poolscope", "build"], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site), "POOLSCOPE_CACHE_DIR": str(tmp_path / "cache")}, timeout=600,
    )
    assert out.returncode == 1
    assert "the native engine could not be built" in out.stderr and "pool.cpp cannot be read" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_compiler_is_named_with_the_package_to_install(tmp_path):
    out = run_python(SCOPE_THEN_ENGINE, CXX="/nonexistent/c++", POOLSCOPE_CACHE_DIR=str(tmp_path), as_user=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no C++ compiler: '/nonexistent/c++' is not on PATH" in out.stdout
    assert "apt install g++" in out.stdout and "dnf install gcc-c++" in out.stdout


def test_an_unwritable_cache_names_the_variable_that_moves_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = run_python(SCOPE_THEN_ENGINE, POOLSCOPE_CACHE_DIR=str(tmp_path / "file" / "cache"), as_user=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["passthrough", "0"]
    assert "cannot write the engine's build folder" in out.stdout and "POOLSCOPE_CACHE_DIR" in out.stdout


def test_a_damaged_cached_library_passes_through_and_the_build_command_rebuilds_it(tmp_path):
    where = tmp_path / _build.build_dir().name
    where.mkdir()
    (where / "poolscope_native.so").write_bytes(b"not a library")
    (where / "built.ok").write_text("0 s\n")
    out = run_python(SCOPE_THEN_ENGINE, POOLSCOPE_CACHE_DIR=str(tmp_path), as_user=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["passthrough", "0"]
    assert "cannot be loaded" in out.stdout and "python -m poolscope build" in out.stdout
    # The build command builds it again (made to fail fast here: a compiler that refuses).
    out = subprocess.run(
        [sys.executable, "-m", "poolscope", "build"], capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "POOLSCOPE_CACHE_DIR": str(tmp_path), "CXX": "/bin/false"}, timeout=600,
    )
    assert out.returncode == 1 and "building it again" in out.stderr and "compiling the native engine" in out.stderr
    assert "Traceback" not in out.stderr


def test_other_platforms_pass_through_and_say_which_platform(tmp_path):
    code = "import sys, torch, poolscope; sys.platform = 'darwin'\n" + SCOPE_THEN_ENGINE
    out = run_python(code, POOLSCOPE_CACHE_DIR=str(tmp_path), as_user=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["passthrough", "0"]
    assert "built and tested on Linux only, and this is 'darwin'" in out.stdout


@pytest.mark.skipif(not torch.version.cuda, reason="only torch's CUDA builds log it (CI's torch 2.15.0 stage runs it)")
def test_torchs_no_cuda_runtime_note_is_not_shown_while_building(tmp_path):
    # A CUDA toolkit and no GPU make torch log "No CUDA runtime is found" when cpp_extension is
    # imported; it reads like an error and does not concern a CPU engine.
    code = "import logging; logging.basicConfig(); {}"
    plain = run_python(code.format("import torch.utils.cpp_extension"), CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    ours = run_python(code.format("from poolscope.engines import build; build._import_cpp_extension()"),
                      CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert plain.returncode == ours.returncode == 0, ours.stderr
    assert "No CUDA runtime is found" in plain.stderr  # the note this test is about does appear
    assert "No CUDA runtime is found" not in ours.stderr
