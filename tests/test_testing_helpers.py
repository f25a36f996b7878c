"""poolscope.testing: assert_no_leaks, the pytest plugin, the hypothesis strategies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import poolscope
from poolscope.testing import assert_no_leaks, check_no_shared_bytes
from poolscope.testing.strategies import shapes_crossing, tensor_specs
from helpers import MiB, ROOT

pytestmark = pytest.mark.pools

KEPT: list[torch.Tensor] = []


class Net(torch.nn.Module):
    def __init__(self, leak: bool = False) -> None:
        super().__init__()
        self.leak = leak
        self.stash: list[torch.Tensor] = []

    @poolscope.pooled_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.zeros(256, 1024, dtype=torch.float64)
        if self.leak:
            self.stash.append(hidden)
        return (hidden + x).sum()


def test_clean_body_passes_and_reports_its_scope():
    net = Net()
    with assert_no_leaks() as check:
        net(torch.ones(1))
        scratch = torch.ones(MiB)
        del scratch
    assert check.scope.stats.escaped == 0
    # the nested forward's zeros and sum input (counted toward the enclosing scope) and the scratch
    assert check.scope.stats.allocations_routed == 3


def test_leak_in_a_nested_forward_is_caught_with_where_it_came_from():
    net = Net(leak=True)
    with pytest.raises(AssertionError) as failure:
        with assert_no_leaks(enable_profiling=True):
            net(torch.ones(1))
    message = str(failure.value)
    assert "1 pooled block(s) still alive after the body (allowed: 0)" in message
    assert "2.00 MiB block (2097152 bytes requested)" in message
    assert "held by a tensor of shape (256, 1024), dtype torch.float64" in message
    assert "test_testing_helpers.py:" in message and " in forward" in message
    assert "kept by an item of Net.stash (a list)" in message  # what the user's code kept it in
    net.stash.clear()


def test_the_report_names_attributes_globals_and_locals_that_keep_a_tensor():
    net = Net()
    with pytest.raises(AssertionError) as failure:
        with assert_no_leaks():
            net.kept = torch.zeros(MiB)
            KEPT.append(torch.ones(MiB))
    message = str(failure.value)
    assert "kept by Net.kept" in message
    assert "kept by an item of the module global test_testing_helpers.KEPT (a list)" in message
    KEPT.clear()
    del net.kept


def test_a_block_allocated_inside_a_library_names_the_users_line_too():
    from poolscope._diagnostics import describe_block

    frames = [
        {"filename": "/env/lib/python3.12/site-packages/transformers/models/bert/modeling_bert.py", "line": 352,
         "name": "forward"},
        {"filename": "/env/lib/python3.12/site-packages/torch/nn/modules/module.py", "line": 1750, "name": "_call_impl"},
        {"filename": "/home/me/serve.py", "line": 12, "name": "embed"},
    ]
    text = describe_block({"size": MiB, "requested_size": MiB, "frames": frames})
    assert text.endswith("allocated at /env/lib/python3.12/site-packages/transformers/models/bert/modeling_bert.py:352 "
                         "in forward, called from /home/me/serve.py:12 in embed")
    assert "called from" not in describe_block({"size": MiB, "requested_size": MiB, "frames": frames[2:]})


def test_global_list_leak_without_profiling_names_shape_and_dtype():
    with pytest.raises(AssertionError, match=r"shape \(1048576,\), dtype torch.int32"):
        with assert_no_leaks():
            KEPT.append(torch.zeros(MiB, dtype=torch.int32))
    KEPT.clear()


def test_allow_escapes_and_decorator_form():
    @assert_no_leaks(allow_escapes=1)
    def returns_one():
        return torch.zeros(MiB)

    out = returns_one()
    assert out.shape == (MiB,)

    @assert_no_leaks(allow_escapes=1)
    def keeps_two():
        KEPT.extend([torch.zeros(MiB), torch.zeros(MiB)])

    with pytest.raises(AssertionError, match=r"2 pooled block\(s\) still alive after the body \(allowed: 1\)"):
        keeps_two()
    KEPT.clear()


def test_garbage_cycles_are_not_leaks():
    with assert_no_leaks():
        cycle = [torch.zeros(MiB)]
        cycle.append(cycle)
        del cycle


def test_exceptions_in_the_body_propagate_unchanged():
    with pytest.raises(KeyError):
        with assert_no_leaks():
            KEPT.append(torch.zeros(MiB))
            raise KeyError("body")
    KEPT.clear()


@pytest.mark.parametrize(("value", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)])
def test_allow_escapes_is_validated(value, error):
    with pytest.raises(error, match=r"allow_escapes must be an int >= 0; got"):
        assert_no_leaks(allow_escapes=value)


def test_inner_escapes_count_in_the_enclosing_scope():
    with poolscope.pool_scope() as outer:
        with poolscope.pool_scope() as inner:
            kept = torch.zeros(MiB)
        assert inner.stats.escaped == 1
    assert outer.stats.escaped == 1
    with poolscope.pool_scope() as outer2:
        with poolscope.pool_scope():
            kept2 = torch.zeros(MiB)
        del kept2
    assert outer2.stats.escaped == 0
    del kept


def test_check_no_shared_bytes_catches_overlap():
    base = torch.zeros(100)
    check_no_shared_bytes([(1, base), (1, base[10:])])  # one allocation, two handles
    with pytest.raises(AssertionError, match=r"allocations \[1, 2\] share the bytes"):
        check_no_shared_bytes([(1, base), (2, torch.empty(0).set_(base.untyped_storage()))])


@settings(max_examples=50, deadline=None)
@given(spec=tensor_specs(MiB))
def test_tensor_specs_cross_the_threshold(spec):
    shape, dtype = spec
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    assert MiB / 4 - dtype.itemsize <= nbytes <= 4 * MiB
    with poolscope.pool_scope() as scope:
        t = torch.zeros(shape, dtype=dtype)
    assert scope.stats.allocations_routed == (1 if nbytes >= MiB else 0)
    del t


def test_shapes_crossing_reach_both_sides():
    from hypothesis import find

    below = find(shapes_crossing(MiB, torch.float32), lambda s: torch.Size(s).numel() * 4 < MiB)
    exact = find(shapes_crossing(MiB, torch.float32), lambda s: torch.Size(s).numel() * 4 == MiB)
    assert torch.Size(below).numel() * 4 < MiB and torch.Size(exact).numel() * 4 == MiB


def _pytest(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_plugin_flag_catches_the_leaky_example_and_passes_the_clean_one():
    example = str(ROOT / "examples" / "leak_testing")
    out = _pytest(example, "--poolscope-leak-check")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED examples/leak_testing/test_attention_leaks.py::test_leaky_attention" in out.stdout
    assert "1 failed, 2 passed" in out.stdout
    assert "allocated at" in out.stdout and "test_attention_leaks.py:42 in forward" in out.stdout
    # What docs/testing.md shows: the scores of lengths 512 and 1024 (256's are under the threshold).
    assert "2 pooled block(s) still alive after the body" in out.stdout
    assert "shape (2, 1024, 1024)" in out.stdout and "shape (2, 512, 512)" in out.stdout
    assert _pytest(example).returncode == 0


def test_plugin_fixture_and_marker(tmp_path):
    (tmp_path / "test_user.py").write_text(
        "import pytest, torch, poolscope\n"
        "KEEP = []\n"
        "def test_fixture_catches(pool_leak_check):\n"
        "    with poolscope.pool_scope():\n"
        "        KEEP.append(torch.zeros(1 << 20))\n"
        "def test_fixture_passes(pool_leak_check):\n"
        "    with poolscope.pool_scope():\n"
        "        torch.zeros(1 << 20)\n"
        "@pytest.mark.poolscope_leak_check(allow_escapes=1)\n"
        "def test_marker_allows_one():\n"
        "    KEEP.append(torch.zeros(1 << 20))\n"
        "def test_unchecked():\n"
        "    KEEP.append(torch.zeros(1 << 20))\n"
    )
    out = _pytest(str(tmp_path), cwd=tmp_path)
    assert "1 failed, 3 passed" in out.stdout, out.stdout + out.stderr
    assert "test_fixture_catches" in out.stdout.split("short test summary")[1]


def test_plugin_flag_passes_a_test_that_expects_a_leak_and_lets_it_die(tmp_path):
    (tmp_path / "test_expects.py").write_text(
        "import pytest, torch, poolscope\n"
        "from poolscope.testing import assert_no_leaks\n"
        "CACHE = []\n"
        "def test_local_leak_caught():\n"
        "    keep = []\n"
        "    with pytest.raises(AssertionError, match='1 pooled block') as excinfo:\n"
        "        with assert_no_leaks():\n"
        "            keep.append(torch.zeros(1 << 20))\n"
        "    assert 'held by a tensor of shape (1048576,)' in str(excinfo.value)\n"
        "def test_module_cache_caught_then_cleared():\n"
        "    with pytest.raises(AssertionError):\n"
        "        with assert_no_leaks():\n"
        "            CACHE.append(torch.zeros(1 << 20))\n"
        "    CACHE.clear()\n"
        "def test_module_cache_kept_is_still_a_leak():\n"
        "    with pytest.raises(AssertionError):\n"
        "        with assert_no_leaks():\n"
        "            CACHE.append(torch.zeros(1 << 20))\n"
    )
    out = _pytest(str(tmp_path), "--poolscope-leak-check", cwd=tmp_path)
    assert "1 failed, 2 passed" in out.stdout, out.stdout + out.stderr
    assert "FAILED test_expects.py::test_module_cache_kept_is_still_a_leak" in out.stdout


def test_plugin_costs_nothing_when_off(tmp_path):
    (tmp_path / "test_light.py").write_text(
        "import sys\n"
        "def test_nothing_heavy_loaded():\n"
        "    assert 'torch' not in sys.modules and 'poolscope' not in sys.modules\n"
    )
    out = _pytest(str(tmp_path), "-p", "poolscope", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    help_text = _pytest("--help", cwd=tmp_path).stdout
    assert "--poolscope-leak-check" in help_text
