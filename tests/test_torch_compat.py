"""Fails loudly when a torch upgrade moves a private API poolscope relies on (Python and C++)."""

from __future__ import annotations

import pytest
import torch

import poolscope
from poolscope import _torch_compat as compat


def test_private_python_apis_exist():
    assert compat.torch_version() >= compat.MIN_TORCH
    assert isinstance(compat.cxx11_abi(), bool)
    assert compat.profiler_enabled() is False
    with torch.profiler.profile():
        assert compat.profiler_enabled() is True


@pytest.mark.pools
def test_native_engine_builds_and_replaces_the_cpu_allocator():
    # c10::SetCPUAllocator / GetCPUAllocator and the c10::Allocator interface (csrc/allocator.cpp).
    from poolscope.engines import engine_for

    assert poolscope.engine() == "native"
    with poolscope.pool_scope():
        pass
    assert engine_for(torch.device("cpu")).module.installed()


@pytest.mark.pools
def test_captured_python_tracebacks_are_symbolized():
    # torch::CapturedTraceback and torch::symbolize (csrc/torch_compat.cpp).
    with poolscope.pool_scope(enable_profiling=True) as scope:
        x = torch.zeros(1 << 20)
        frames = scope.live_blocks()[0]["frames"]
    assert frames[0]["filename"] == __file__ and frames[0]["name"] == "test_captured_python_tracebacks_are_symbolized"
    assert isinstance(frames[0]["line"], int)
    del x


@pytest.mark.pools
def test_raw_allocate_and_raw_deallocate_work_through_the_pool():
    # oneDNN kernels such as gelu allocate scratch through c10's raw interface, which
    # needs a raw deleter and data == context for every allocation.
    x = torch.randn(256, 1024)
    with poolscope.pool_scope(threshold=0):
        y = torch.nn.functional.gelu(x)
        z = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.equal(y, torch.nn.functional.gelu(x))
    assert torch.equal(z, torch.nn.functional.gelu(x, approximate="tanh"))
