"""Hand-written global pool compatibility: the integration template users wrote works unchanged on poolscope."""

from __future__ import annotations

from typing import Tuple

import pytest
import torch
import torch.nn as nn

import poolscope
from poolscope import get_global_memory_pool


class SeedModule(nn.Module):
    """The integration template from shared/seed/, verbatim apart from the import."""

    def __init__(self, enable_memory_pool: bool = False, enable_profiling: bool = False):
        super().__init__()
        self.enable_memory_pool = enable_memory_pool
        self._memory_pool = None
        if self.enable_memory_pool:
            self._memory_pool = get_global_memory_pool(enable_profiling=enable_profiling)

    def _allocate_tensor(
        self, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device, zero_init: bool = True
    ) -> torch.Tensor:
        if self._memory_pool is not None:
            num_elements = 1
            for dim in shape:
                num_elements *= dim
            size_mb = (num_elements * dtype.itemsize) / (1024 * 1024)
            if size_mb >= 1.0:
                tensor = self._memory_pool.allocate(shape, dtype, device)
                if zero_init:
                    tensor.zero_()
                return tensor
        if zero_init:
            return torch.zeros(shape, dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, device=device)

    def _deallocate_tensor(self, tensor: torch.Tensor) -> None:
        if self._memory_pool is not None:
            self._memory_pool.deallocate(tensor)

    def forward(self, x):
        buf = self._allocate_tensor((x.shape[0], 512, 1024), x.dtype, x.device)
        buf += x[:, None, None]
        out = buf.sum(dim=(1, 2))
        self._deallocate_tensor(buf)
        return out


def test_singleton_and_profiling_switch():
    pool = get_global_memory_pool()
    assert get_global_memory_pool(enable_profiling=True) is pool
    assert pool.enable_profiling is True
    with pytest.raises(TypeError, match=r"enable_profiling must be True or False; got 'yes'"):
        get_global_memory_pool(enable_profiling="yes")


def test_seed_template_gives_same_results():
    x = torch.randn(4)
    assert torch.equal(SeedModule(True)(x), SeedModule(False)(x))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]
)
def test_every_dtype_allocates(dtype):
    pool = get_global_memory_pool()
    t = pool.allocate((1024, 1024), dtype, "cpu")
    assert t.dtype == dtype and t.shape == (1024, 1024) and t.is_contiguous()
    assert not t.any()
    pool.deallocate(t)
    pool.deallocate(t)  # a second deallocate is harmless


def test_deallocate_is_only_a_hint():
    pool = get_global_memory_pool()
    t = pool.allocate((1 << 20,), torch.float32, "cpu", zero_init=False)
    t.fill_(5)
    view = t[100:]
    pool.deallocate(t)
    del t
    other = pool.allocate((1 << 20,), torch.float32, "cpu")  # must not get view's memory
    assert torch.all(view == 5) and not other.any()
    assert other.data_ptr() != view.data_ptr() - 400


def test_two_callers_never_share_a_buffer():
    pool = get_global_memory_pool()
    tensors = [pool.allocate((1 << 18,), torch.float32, "cpu", zero_init=False) for _ in range(8)]
    for i, t in enumerate(tensors):
        t.fill_(i)
    assert len({t.data_ptr() for t in tensors}) == 8
    assert all(torch.all(t == i) for i, t in enumerate(tensors))


def test_bad_arguments():
    pool = get_global_memory_pool()
    with pytest.raises(ValueError, match=r"negative sizes; got \(4, -1\)"):
        pool.allocate((4, -1), torch.float32, "cpu")
    with pytest.raises(TypeError, match=r"shape must contain ints; got \(4, 2.5\)"):
        pool.allocate((4, 2.5), torch.float32, "cpu")
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype"):
        pool.allocate((4,), "float32", "cpu")
    with pytest.raises(ValueError, match=r"not a device"):
        pool.allocate((4,), torch.float32, "gpu7")
    with pytest.raises(TypeError, match=r"deallocate takes a torch.Tensor; got \[1\]"):
        pool.deallocate([1])
    assert pool.allocate(0, torch.float32, "cpu").shape == (0,)


def test_newer_seed_signature_with_positional_strategy():
    # The hand-written pools' newer interface: allocate(shape, dtype=float32, device=None, strategy="auto").
    pool = get_global_memory_pool()
    for strategy in ("auto", "bucketed", "fragment_aware", "numa_aware", "fallback"):
        t = pool.allocate((256, 1024), torch.float16, None, strategy)
        assert t.dtype == torch.float16 and t.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        assert not t.any()
    assert pool.allocate((4, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"strategy must be one of \('auto', 'bucketed'.*got 'fastest'"):
        pool.allocate((4,), torch.float32, "cpu", "fastest")
    with pytest.raises(TypeError, match=r"got False of type bool \(pass zero_init= by keyword\)"):
        pool.allocate((4,), torch.float32, "cpu", False)


@pytest.mark.pools
def test_allocate_is_pooled_and_does_not_count_as_a_scope_exit():
    pool = get_global_memory_pool()
    before = poolscope.get_pool("cpu").stats()
    t = pool.allocate((1 << 20,), torch.float32, "cpu")
    after = poolscope.get_pool("cpu").stats()
    assert after.blocks_in_use == before.blocks_in_use + 1
    del t
    # an allocate is not a scope of the user's: the cache's working set is measured over scope exits
    with poolscope.pool_scope():
        pass
    assert poolscope.get_pool("cpu").stats().working_set_bytes >= 4 << 20
