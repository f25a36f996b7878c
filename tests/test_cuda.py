"""The CUDA engine on a real GPU; skipped on machines without one (scripts/gpu-check runs these)."""

from __future__ import annotations

import gc

import pytest
import torch

import poolscope
from helpers import MiB, assert_same

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_scopes_use_the_mempool_engine():
    assert poolscope.engine("cuda") == "mempool"


def test_results_are_bit_identical_and_land_in_the_pool():
    pool = poolscope.TensorPool("cuda")
    torch.manual_seed(0)
    plain = [torch.randn(MiB, device="cuda"), torch.zeros(MiB, device="cuda"), torch.arange(MiB, device="cuda")]
    torch.manual_seed(0)
    with poolscope.pool_scope(pool=pool) as scope:
        pooled = [torch.randn(MiB, device="cuda"), torch.zeros(MiB, device="cuda"), torch.arange(MiB, device="cuda")]
    for a, b in zip(plain, pooled):
        assert_same(a, b)
    assert scope.stats.escaped == 3 and pool.stats().blocks_in_use >= 3
    del pooled
    gc.collect()
    assert pool.stats().blocks_in_use == 0


def test_cpu_allocations_stay_out_of_a_cuda_scope():
    pool = poolscope.TensorPool("cuda")
    with poolscope.pool_scope(pool=pool) as scope:
        cpu = torch.zeros(MiB)
        gpu = torch.zeros(MiB, device="cuda")
    assert scope.stats.escaped == 1 and pool.stats().bytes_in_use >= 4 * MiB
    del cpu, gpu


def test_nested_scopes_on_two_pools_each_receive_their_own():
    outer_pool, inner_pool = poolscope.TensorPool("cuda"), poolscope.TensorPool("cuda")
    with poolscope.pool_scope(pool=outer_pool):
        a = torch.ones(MiB, device="cuda")
        with poolscope.pool_scope(pool=inner_pool):
            b = torch.ones(2 * MiB, device="cuda")
        c = torch.ones(MiB, device="cuda")
    assert inner_pool.stats().blocks_in_use == 1  # torch.cuda.use_mem_pool nested would leave it empty
    assert outer_pool.stats().blocks_in_use == 2
    del a, b, c


def test_strict_scope_raises_on_escape():
    with pytest.raises(poolscope.EscapeError):
        with poolscope.pool_scope("cuda", strict=True):
            kept = torch.ones(MiB, device="cuda")
    del kept


def test_blocks_are_not_reused_on_another_stream_before_its_work_is_done():
    pool = poolscope.TensorPool("cuda")
    side = torch.cuda.Stream()
    with poolscope.pool_scope(pool=pool):
        a = torch.ones(4 * MiB, device="cuda")
        ptr = a.data_ptr()
        del a
        with torch.cuda.stream(side):
            b = torch.ones(4 * MiB, device="cuda")  # a's block belongs to the default stream
        torch.cuda.synchronize()
    assert b.data_ptr() != ptr
    del b


def test_release_hands_the_pools_memory_back():
    pool = poolscope.TensorPool("cuda")
    with poolscope.pool_scope(pool=pool):
        x = torch.ones(64 * MiB, device="cuda")
        del x
    reserved_before = torch.cuda.memory_reserved()
    assert pool.stats().bytes_reserved >= 256 * MiB
    pool.empty_cache()
    assert pool.stats().bytes_reserved == 0
    assert torch.cuda.memory_reserved() <= reserved_before - 256 * MiB


def test_training_step_bit_identical():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).cuda()
    x = torch.randn(512, 1024, device="cuda")
    model(x).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with poolscope.pool_scope("cuda"):
        model(x).square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        assert torch.equal(a, p.grad)
