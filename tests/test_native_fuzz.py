"""Randomized programs against the native engine (tests/tools/native_fuzz.py), with fixed seeds."""

from __future__ import annotations

import pytest
import torch

from tools.native_fuzz import run

pytestmark = pytest.mark.pools


@pytest.fixture
def one_thread():
    # Programs fork; a child of a process whose OpenMP pool has run can hang in plain PyTorch.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore::poolscope.PoolscopeWarning")
def test_random_programs_keep_tensors_apart_intact_capped_and_leave_nothing_in_use(one_thread):
    counts = run(seeds=list(range(6)), steps=200)
    assert counts.programs == 6 and counts.allocations > 300
    assert counts.forks > 0 and counts.refusals > 0  # both corners were reached
    assert {"resize", "out", "drop_elsewhere", "exit"} <= set(counts.by_op)
