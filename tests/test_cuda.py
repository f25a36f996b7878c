"""CUDA behaviour; skipped on machines without a GPU."""

from __future__ import annotations

import pytest
import torch

import poolscope
from helpers import assert_same

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
MiB = 1 << 20


def test_cuda_factories_bit_identical_and_pooled():
    torch.manual_seed(0)
    plain = [torch.randn(MiB, device="cuda"), torch.zeros(MiB, device="cuda"), torch.arange(MiB, device="cuda")]
    torch.manual_seed(0)
    with poolscope.pool_scope() as scope:
        pooled = [torch.randn(MiB, device="cuda"), torch.zeros(MiB, device="cuda"), torch.arange(MiB, device="cuda")]
    assert scope.stats.allocations_routed == 3
    for a, b in zip(plain, pooled):
        assert_same(a, b)


def test_device_filter_keeps_cpu_out():
    with poolscope.pool_scope("cuda") as scope:
        torch.zeros(MiB)
        x = torch.zeros(MiB, device="cuda")
    assert scope.stats.allocations_routed == 1
    del x


def test_blocks_are_not_shared_across_streams():
    pool = poolscope.TensorPool("cuda")
    side = torch.cuda.Stream()
    with poolscope.pool_scope(pool=pool):
        a = torch.ones(MiB, device="cuda")
        del a
        with torch.cuda.stream(side):
            b = torch.ones(MiB, device="cuda")  # a's block belongs to the default stream
        torch.cuda.synchronize()
    stats = pool.stats()
    assert stats.misses == 2 and stats.hits == 0
    del b


def test_release_and_reuse_on_one_stream():
    pool = poolscope.TensorPool("cuda")
    with poolscope.pool_scope(pool=pool):
        for _ in range(10):
            x = torch.randn(MiB, device="cuda")
            y = (x * 2).sum()
            del x
    torch.cuda.synchronize()
    assert pool.stats().misses == 1 and pool.stats().hits == 9
    assert torch.isfinite(y)
