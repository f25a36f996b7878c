"""Blocks come back exactly when the last reference dies, never earlier, and are never lent twice."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import poolscope
from helpers import MiB

pytestmark = pytest.mark.pools



def in_use(pool: poolscope.TensorPool) -> int:
    return pool.stats().blocks_in_use


def test_views_keep_the_block(pool):
    with poolscope.pool_scope(pool=pool):
        x = torch.zeros(MiB)
    view = x[10:].view(-1, 2)
    del x
    assert in_use(pool) == 1
    view.fill_(1)
    del view
    assert in_use(pool) == 0


def test_untyped_storage_keeps_the_block(pool):
    with poolscope.pool_scope(pool=pool):
        x = torch.ones(MiB)
    storage = x.untyped_storage()
    del x
    assert in_use(pool) == 1
    y = torch.empty(0).set_(storage)
    del storage
    assert in_use(pool) == 1 and y.sum().item() == MiB
    del y
    assert in_use(pool) == 0


def test_autograd_saved_tensors_keep_the_block(pool):
    w = torch.randn(MiB, requires_grad=True)
    with poolscope.pool_scope(pool=pool):
        noise = torch.randn(MiB)
        loss = (w * noise).sum()  # saves noise for backward
    expected = noise.clone()
    del noise
    assert in_use(pool) == 1
    loss.backward()
    assert torch.equal(w.grad, expected)
    del loss
    assert in_use(pool) == 0


def test_inference_mode_tensors(pool):
    with torch.inference_mode():
        with poolscope.pool_scope(pool=pool):
            x = torch.ones(MiB)
            assert x.is_inference()
        del x
    assert in_use(pool) == 0


def test_reference_cycles_release_on_collection(pool):
    class Holder:
        pass

    with poolscope.pool_scope(pool=pool):
        h = Holder()
        h.me = h
        h.t = torch.zeros(MiB)
    del h
    assert in_use(pool) == 1
    gc.collect()
    assert in_use(pool) == 0


def test_tensor_freed_in_another_thread_returns_its_block(pool):
    with poolscope.pool_scope(pool=pool):
        box = [torch.ones(MiB)]
    t = threading.Thread(target=box.clear)
    t.start()
    t.join()
    assert in_use(pool) == 0 and pool.stats().bytes_cached == 4 * MiB


def test_escaped_tensor_stays_valid_and_is_not_reused(pool):
    with poolscope.pool_scope(pool=pool) as scope:
        kept = torch.full((MiB,), 7.0)
    assert scope.stats.escaped == 1
    with poolscope.pool_scope(pool=pool) as second:
        other = torch.zeros(MiB)
    assert second.stats.hits == 0  # the escaped block was not lent again
    assert kept.data_ptr() != other.data_ptr()
    assert torch.all(kept == 7.0)
    del kept, other


def test_loop_in_one_scope_runs_in_flat_memory(pool):
    with poolscope.pool_scope(pool=pool) as scope:
        for _ in range(50):
            a = torch.randn(MiB)
            b = torch.zeros_like(a)
            del a, b
    stats = pool.stats()
    assert stats.misses == 2 and stats.hits == 98
    assert stats.bytes_reserved == 2 * 4 * MiB
    assert scope.stats.escaped == 0


def test_a_freed_block_serves_the_next_request_of_its_size(pool):
    with poolscope.pool_scope(pool=pool, threshold=0):
        a = torch.empty(MiB + 10, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        b = torch.empty(MiB + 10, dtype=torch.uint8)
        assert b.data_ptr() == ptr
        c = torch.empty(MiB + 10, dtype=torch.uint8)  # b holds the block: other memory
        assert c.data_ptr() >= ptr + b.nbytes or c.data_ptr() + c.nbytes <= ptr
    del b, c


def test_a_large_free_block_is_split_for_smaller_requests_and_merged_back(pool):
    with poolscope.pool_scope(pool=pool):
        big = torch.empty(64 * MiB, dtype=torch.uint8)
        base = big.data_ptr()
        del big
        parts = [torch.empty(16 * MiB, dtype=torch.uint8) for _ in range(4)]
        assert sorted(p.data_ptr() - base for p in parts) == [0, 16 * MiB, 32 * MiB, 48 * MiB]
        assert pool.stats().misses == 1
        del parts
        again = torch.empty(64 * MiB, dtype=torch.uint8)  # the pieces merged back into one block
        assert again.data_ptr() == base and pool.stats().misses == 1
    del again


def test_lent_blocks_stay_within_1_25x_of_the_request(pool):
    sizes = [2048, 4097, MiB - 1, MiB + 1, 3 * MiB + 7, 10 * MiB + 3, 33 * MiB]
    with poolscope.pool_scope(pool=pool, threshold=0):
        for n in sizes:
            for reuse in range(2):
                t = torch.empty(n, dtype=torch.uint8)
                s = pool.stats()
                assert n <= s.bytes_in_use <= 1.25 * n, (n, reuse, s.bytes_in_use)
                del t
        big = torch.empty(100 * MiB, dtype=torch.uint8)
        del big
        small = torch.empty(10 * MiB, dtype=torch.uint8)  # carved from the cached 100 MiB block
        assert pool.stats().bytes_in_use <= 1.25 * 10 * MiB
    del small


def test_storage_of_a_pooled_tensor_can_grow(pool):
    with poolscope.pool_scope(pool=pool):
        x = torch.arange(MiB, dtype=torch.float32)
        x.resize_(4 * MiB)  # a larger storage: allocated again, pooled again
        assert torch.equal(x[:MiB], torch.arange(MiB, dtype=torch.float32))
        assert pool.stats().blocks_in_use == 1
    x.resize_(8 * MiB)  # outside the scope: the ordinary allocator, the old block comes back
    assert torch.equal(x[:MiB], torch.arange(MiB, dtype=torch.float32))
    assert in_use(pool) == 0
    del x


def test_untyped_storage_resize_to_zero_frees_the_block(pool):
    # What FSDP does to free a parameter's memory.
    with poolscope.pool_scope(pool=pool):
        x = torch.ones(MiB)
    x.untyped_storage().resize_(0)
    assert in_use(pool) == 0
    with poolscope.pool_scope(pool=pool):
        x.untyped_storage().resize_(4 * MiB)
    assert in_use(pool) == 1 and x.untyped_storage().nbytes() == 4 * MiB
    del x


@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized")
def test_out_into_a_too_small_pooled_tensor_resizes_it(pool):
    a = torch.randn(1024, 1024)
    with poolscope.pool_scope(pool=pool):
        out = torch.empty(256, 1024)
        torch.matmul(a, a, out=out)
    assert out.shape == (1024, 1024)
    assert torch.equal(out, a @ a)
    del out


def test_cap_gives_back_what_exceeds_it(pool):
    pool.max_cached_bytes = "8MiB"
    with poolscope.pool_scope(pool=pool):
        xs = [torch.empty(4 * MiB, dtype=torch.uint8) for _ in range(4)]
        del xs
        assert pool.stats().bytes_cached <= 8 * MiB
    pool.max_cached_bytes = 0
    assert pool.stats().bytes_cached == 0 and pool.stats().segments == 0


def test_empty_cache_keeps_live_blocks(pool):
    with poolscope.pool_scope(pool=pool):
        live = torch.ones(MiB)
        dead = torch.ones(MiB)
    del dead
    pool.empty_cache()
    stats = pool.stats()
    assert stats.bytes_cached == 0 and stats.blocks_in_use == 1
    assert live.sum().item() == MiB
    del live


def test_strict_scope_raises_on_escape(pool):
    with pytest.raises(poolscope.EscapeError, match=r"1 pooled tensor\(s\) still alive"):
        with poolscope.pool_scope(pool=pool, strict=True):
            kept = torch.zeros(MiB)
    assert kept.sum().item() == 0
    del kept
    with poolscope.pool_scope(pool=pool, strict=True) as clean:
        out = torch.zeros(MiB).sum()
    assert clean.stats.escaped == 0 and out.item() == 0


def test_strict_ignores_garbage_cycles(pool):
    with poolscope.pool_scope(pool=pool, strict=True) as scope:
        cycle = [torch.zeros(MiB)]
        cycle.append(cycle)
        del cycle
    assert scope.stats.escaped == 0


def test_peak_and_requested_bytes(pool):
    with poolscope.pool_scope(pool=pool):
        a = torch.empty(MiB + 1, dtype=torch.uint8)
        stats = pool.stats()
        assert stats.bytes_requested == MiB + 1
        assert MiB + 1 < stats.bytes_in_use <= 1.25 * (MiB + 1)
        del a
    assert pool.stats().peak_bytes_in_use == stats.bytes_in_use
