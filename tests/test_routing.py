"""What a scope routes into the pool and what it leaves alone."""

from __future__ import annotations

import pytest
import torch

import poolscope
from helpers import assert_same

MiB = 1 << 20


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


def test_left_alone():
    x = torch.empty(MiB)
    assert routed(lambda: torch.zeros(MiB, device="meta")) == 0
    assert routed(lambda: torch.zeros(MiB, out=x)) == 0
    assert routed(lambda: torch.empty(MiB, layout=torch.sparse_coo)) == 0
    assert routed(lambda: x + 1) == 0  # op outputs are not factories
    assert routed(lambda: torch.zeros_like(torch.empty(MiB, device="meta"))) == 0


def test_fake_tensor_mode_is_never_routed():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        with poolscope.pool_scope(threshold=0) as scope:
            out = torch.zeros(MiB)
            like = torch.randn_like(out)
    assert scope.stats.allocations_routed == 0
    assert type(out).__name__ == "FakeTensor" and type(like).__name__ == "FakeTensor"


def test_device_filter():
    assert routed(lambda: torch.zeros(MiB), device="cpu") == 1
    pool = poolscope.TensorPool("cpu")
    assert routed(lambda: torch.zeros(MiB), pool=pool) == 1
    assert pool.stats().misses == 1


def test_explicit_pool_gets_the_blocks_and_default_pool_does_not(pool):
    default_before = poolscope.get_pool("cpu").stats()
    with poolscope.pool_scope(pool=pool):
        x = torch.zeros(MiB)
        assert pool.stats().blocks_in_use == 1
    assert poolscope.get_pool("cpu").stats().misses == default_before.misses
    del x


def test_torch_device_context_inside_and_outside():
    with torch.device("cpu"):
        assert routed(lambda: torch.zeros(MiB)) == 1
    with poolscope.pool_scope() as scope:
        with torch.device("cpu"):
            x = torch.ones(MiB)
    assert scope.stats.allocations_routed == 1
    assert_same(x, torch.ones(MiB))


def test_parameter_new_zeros_routed():
    p = torch.nn.Parameter(torch.randn(4, 4))
    assert routed(lambda: p.new_zeros(MiB)) == 1


def test_plain_subclass_keeps_its_type():
    class Sub(torch.Tensor):
        pass

    s = torch.randn(MiB).as_subclass(Sub)
    plain = torch.zeros_like(s)
    with poolscope.pool_scope() as scope:
        out = torch.zeros_like(s)
    assert scope.stats.allocations_routed == 1
    assert type(out) is type(plain) is Sub
    assert torch.equal(out, plain)


def test_subclass_with_its_own_dispatch_left_alone():
    from torch.testing._internal.two_tensor import TwoTensor

    t = TwoTensor(torch.randn(MiB), torch.randn(MiB))
    with poolscope.pool_scope() as scope:
        out = torch.zeros_like(t)
    assert scope.stats.allocations_routed == 0
    assert type(out) is TwoTensor


def test_stats_count_bytes_hits_and_misses(pool):
    with poolscope.pool_scope(pool=pool) as scope:
        a = torch.zeros(MiB)
        del a
        b = torch.zeros(MiB)  # the same size class: a hit
        c = torch.zeros(2 * MiB)
    stats = scope.stats
    assert (stats.allocations_routed, stats.bytes_routed) == (3, 4 * MiB * 4)
    assert (stats.hits, stats.misses, stats.escaped) == (1, 2, 2)
    assert stats.hit_rate == pytest.approx(1 / 3)
    del b, c
