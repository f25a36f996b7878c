"""Blocks come back exactly when the last reference dies, and never earlier."""

from __future__ import annotations

import gc

import torch

import poolscope

MiB = 1 << 20


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
    gc.collect()
    assert in_use(pool) == 0


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


def test_freed_block_is_reused_in_the_same_size_class(pool):
    with poolscope.pool_scope(pool=pool):
        a = torch.empty(MiB + 10, dtype=torch.uint8)
        ptr = a.data_ptr()
        del a
        b = torch.empty(MiB + 1000, dtype=torch.uint8)  # same size class
        assert b.data_ptr() == ptr
        c = torch.empty(MiB + 10, dtype=torch.uint8)  # b holds the block: a new one
        assert c.data_ptr() != ptr
    del b, c


def test_size_classes_stay_within_1_25x():
    from poolscope._pool import size_class

    for n in [1, 511, 512, 4097, MiB - 1, MiB, MiB + 1, 3 * MiB + 7, (1 << 31) + 1, 10**10]:
        c = size_class(n)
        assert n <= c <= 1.25 * n + 512, n


def test_cap_evicts_oldest_and_applies_at_scope_exit():
    pool = poolscope.TensorPool("cpu", max_cached_bytes="8MiB")
    with poolscope.pool_scope(pool=pool):
        xs = [torch.empty(4 * MiB, dtype=torch.uint8) for _ in range(4)]
        del xs
        assert pool.stats().bytes_cached <= 8 * MiB
    stats = pool.stats()
    assert stats.bytes_cached == 8 * MiB and stats.evictions == 2
    pool.max_cached_bytes = 0
    assert pool.stats().bytes_cached == 0 and pool.stats().evictions == 4


def test_empty_cache_keeps_live_blocks(pool):
    with poolscope.pool_scope(pool=pool):
        live = torch.ones(MiB)
        dead = torch.ones(MiB)
    del dead
    pool.empty_cache()
    stats = pool.stats()
    assert stats.blocks_cached == 0 and stats.blocks_in_use == 1
    assert live.sum().item() == MiB
    del live


def test_strict_scope_raises_on_escape(pool):
    import pytest

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
