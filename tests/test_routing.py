"""What a scope routes into the pool, and what it leaves alone."""

from __future__ import annotations

import os

import threading

import pytest
import torch
import torch.nn.functional as F

import poolscope
from conftest import needs_compile
from helpers import MiB, assert_same

pytestmark = pytest.mark.pools



def routed(call, **scope_kwargs) -> int:
    with poolscope.pool_scope(**scope_kwargs) as scope:
        out = call()
    del out
    return scope.stats.allocations_routed


def test_default_threshold_is_one_mib_inclusive():
    assert routed(lambda: torch.empty(MiB, dtype=torch.uint8)) == 1
    assert routed(lambda: torch.empty(MiB // 4)) == 1  # float32: exactly 1 MiB
    assert routed(lambda: torch.empty(MiB - 1, dtype=torch.uint8)) == 0
    assert routed(lambda: torch.zeros(10)) == 0


@pytest.mark.parametrize(
    ("threshold", "nbytes", "expected"),
    [("4MiB", 4 * MiB, 1), ("4MiB", 4 * MiB - 1, 0), ("512KB", 512_000, 1), ("512KB", 511_999, 0), (0, 1, 1)],
)
def test_threshold_strings(threshold, nbytes, expected):
    assert routed(lambda: torch.empty(nbytes, dtype=torch.uint8), threshold=threshold) == expected


def test_zero_byte_tensors_are_never_routed():
    assert routed(lambda: torch.empty(0, 5), threshold=0) == 0


def test_storage_extent_not_numel_decides():
    # 1024 x 1024 float32 but every row shares one storage row: 4 KiB of storage.
    assert routed(lambda: torch.empty_strided((1024, 1024), (0, 1))) == 0


def test_op_outputs_are_routed():
    x = torch.randn(512, 512)
    assert routed(lambda: x @ x) == 1
    assert routed(lambda: x + 1) == 1
    assert routed(lambda: torch.cat([x, x])) == 1
    assert routed(lambda: x.softmax(-1)) == 1
    assert routed(lambda: x.sum()) == 0  # a small output


def test_multi_output_kernels_are_routed():
    x = torch.randn(1024, 1024)
    with poolscope.pool_scope() as scope:
        values, indices = torch.sort(x, dim=-1)
    assert scope.stats.allocations_routed >= 2  # values and indices (and the sort's own scratch)
    del values, indices
    with poolscope.pool_scope() as scope:
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, (1024,), None, None, 1e-5)
    assert scope.stats.allocations_routed == 1  # the output; mean and rstd are 4 KiB each
    del out, mean, rstd


def test_fused_attention_kernel_is_routed():
    q = k = v = torch.randn(1, 8, 1024, 64)
    with torch.no_grad(), poolscope.pool_scope(threshold="256KiB") as scope:
        out = F.scaled_dot_product_attention(q, k, v)
    assert scope.stats.allocations_routed >= 1
    assert_same(out, F.scaled_dot_product_attention(q, k, v))
    del out


def test_composites_under_inference_mode_are_routed():
    q = k = v = torch.randn(1, 4, 512, 64)

    def attention():
        scores = torch.matmul(q, k.transpose(-1, -2)) / 8
        return torch.matmul(scores.softmax(-1), v)

    with torch.inference_mode():
        plain = attention()
        with poolscope.pool_scope(threshold="512KiB") as scope:
            pooled = attention()
    # scores (4 MiB), the division (4 MiB), softmax (4 MiB); the output is 512 KiB
    assert scope.stats.allocations_routed == 4
    assert_same(pooled, plain)


def test_backward_run_in_the_scope_thread_is_routed():
    w = torch.randn(1024, 1024, requires_grad=True)
    x = torch.randn(256, 1024)
    with poolscope.pool_scope() as scope:
        loss = (x @ w).tanh().sum()
        before = scope.stats.allocations_routed
        loss.backward()
    assert scope.stats.allocations_routed > before  # the weight gradient (4 MiB) at least
    grad = w.grad.clone()
    w.grad = None
    (x @ w).tanh().sum().backward()
    assert torch.equal(grad, w.grad)


@needs_compile
def test_inductor_buffers_are_routed():
    pytest.importorskip("torch._inductor")

    def f(x):
        return (x.sin() @ x.cos()).relu() + 1

    compiled = torch.compile(f, backend="inductor")
    x = torch.randn(512, 512)
    expected = compiled(x)  # compile outside the scope
    with poolscope.pool_scope() as scope:
        out = compiled(x)
    assert scope.stats.allocations_routed >= 1
    assert torch.equal(out, expected)


def test_meta_and_fake_tensors_take_no_memory():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert routed(lambda: torch.zeros(MiB, device="meta")) == 0
    with FakeTensorMode():
        with poolscope.pool_scope() as scope:
            out = torch.zeros(MiB)
            like = torch.randn_like(out)
    assert scope.stats.allocations_routed == 0
    assert type(out).__name__ == "FakeTensor" and type(like).__name__ == "FakeTensor"


def test_out_arguments_reuse_the_given_memory():
    x = torch.empty(MiB)
    assert routed(lambda: torch.zeros(MiB, out=x)) == 0


def test_explicit_pool_gets_the_blocks_and_the_shared_pool_does_not(pool):
    shared_before = poolscope.get_pool("cpu").stats()
    with poolscope.pool_scope(pool=pool):
        x = torch.zeros(MiB)
        assert pool.stats().blocks_in_use == 1
    shared = poolscope.get_pool("cpu").stats()
    assert (shared.misses, shared.hits) == (shared_before.misses, shared_before.hits)
    del x


def test_cpu_index_zero_is_the_cpu():
    assert routed(lambda: torch.zeros(MiB), device="cpu:0") == 1
    assert routed(lambda: torch.zeros(MiB), device=torch.device("cpu", 0)) == 1


def test_innermost_scope_governs():
    with poolscope.pool_scope(threshold="64MiB") as outer:
        small = torch.zeros(MiB)  # under the outer threshold
        with poolscope.pool_scope(threshold=0) as inner:
            a = torch.zeros(MiB)
            b = torch.zeros(8)
        c = torch.zeros(8 * MiB)  # outer again: still under 64 MiB
        big = torch.zeros(16 * MiB)
    assert inner.stats.allocations_routed == 2
    assert outer.stats.allocations_routed == 3  # the inner scope's two count toward the outer one
    del small, a, b, c, big


def test_scope_routes_only_its_own_thread():
    pool = poolscope.TensorPool("cpu")
    started, done = threading.Event(), threading.Event()
    results = {}

    def other_thread():
        started.wait()
        results["t"] = torch.zeros(MiB)
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with poolscope.pool_scope(pool=pool) as scope:
        started.set()
        done.wait(timeout=30)
    t.join()
    assert scope.stats.allocations_routed == 0
    assert pool.stats().misses == 0


def test_stats_count_bytes_hits_and_misses(pool):
    with poolscope.pool_scope(pool=pool) as scope:
        a = torch.zeros(MiB)
        del a
        b = torch.zeros(MiB)  # the block just freed: a hit
        c = torch.zeros(2 * MiB)
    stats = scope.stats
    assert (stats.allocations_routed, stats.bytes_routed) == (3, 4 * MiB * 4)
    assert (stats.hits, stats.misses, stats.escaped) == (1, 2, 2)
    assert stats.hit_rate == pytest.approx(1 / 3)
    del b, c


def _malloc_bytes() -> int:
    """Bytes glibc's malloc has handed out (heap and mmapped), from mallinfo2."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    if os.environ.get("POOLSCOPE_SANITIZER"):
        pytest.skip("a sanitizer's allocator replaces glibc's malloc: mallinfo2 does not see it")
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_the_replaced_allocator_serves_everything_outside_scopes_and_the_pool_what_is_inside():
    # Which allocator poolscope replaced depends on the build: c10's over glibc's malloc on
    # x86_64, c10's over mimalloc (inside libc10) on aarch64 from torch 2.10, or a preloaded
    # tcmalloc. glibc's own statistics see the first; resident memory sees every one.
    with poolscope.pool_scope():  # installs the allocator
        pass
    before = _malloc_bytes()
    probe = torch.empty(64 * MiB // 4)
    glibc = _malloc_bytes() - before >= 64 * MiB
    del probe
    if glibc:
        with poolscope.pool_scope():  # warms the pool
            torch.empty(64 * MiB // 4)
        before = _malloc_bytes()
        outside = torch.empty(64 * MiB // 4)
        assert _malloc_bytes() - before >= 64 * MiB  # chained: glibc (through c10's allocator) served it
        before = _malloc_bytes()
        with poolscope.pool_scope() as scope:
            inside = torch.empty(64 * MiB // 4)
        assert scope.stats.hits == 1
        assert _malloc_bytes() - before < MiB  # the pool's cached block, not a new malloc
    else:
        size = 192 * MiB // 4  # more than anything the suite frees: the allocator has no such memory resident
        pool = poolscope.get_pool("cpu")
        held = pool.stats().bytes_in_use
        before = _resident_bytes()
        outside = torch.zeros(size)
        assert _resident_bytes() - before >= 160 * MiB  # fresh memory from the replaced allocator
        assert pool.stats().bytes_in_use == held  # not the pool's
        with poolscope.pool_scope():  # warms the pool: the block stays cached and resident
            torch.zeros(size)
        before = _resident_bytes()
        with poolscope.pool_scope() as scope:
            inside = torch.zeros(size)
        assert scope.stats.hits == 1
        assert _resident_bytes() - before < 16 * MiB  # the pool's resident block, no new memory
    del outside, inside
