"""pooled_forward on functions, methods, modules, staticmethods and classmethods."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn

import poolscope
from helpers import MiB, assert_same



class Scratch(nn.Module):
    def __init__(self, enable_memory_pool: bool = True) -> None:
        super().__init__()
        self.enable_memory_pool = enable_memory_pool
        self.lin = nn.Linear(256, 256)

    @poolscope.pooled_forward
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Scale and project."""
        buf = torch.zeros(x.shape[0], 1024, 256)
        noise = torch.randn_like(buf)
        return self.lin((buf + noise).mean(1) + x) * scale


def _pool_misses_and_hits():
    s = poolscope.get_pool().stats()
    return s.misses + s.hits


@pytest.mark.pools
def test_module_forward_bit_identical_and_pooled():
    torch.manual_seed(0)
    pooled_model = Scratch()
    plain_model = Scratch(enable_memory_pool=False)
    plain_model.load_state_dict(pooled_model.state_dict())
    x = torch.randn(8, 256)
    before = _pool_misses_and_hits()
    torch.manual_seed(3)
    a = pooled_model(x, scale=2.0)
    assert _pool_misses_and_hits() - before == 3  # buf, noise and their sum (8 MiB each)
    middle = _pool_misses_and_hits()
    torch.manual_seed(3)
    b = plain_model(x, scale=2.0)
    assert _pool_misses_and_hits() == middle  # the hand-written pools' per-module switch turns pooling off
    assert_same(a, b)


def test_metadata_is_preserved():
    assert Scratch.forward.__name__ == "forward"
    assert Scratch.forward.__doc__ == "Scale and project."
    params = list(inspect.signature(Scratch.forward).parameters)
    assert params == ["self", "x", "scale"]
    assert list(inspect.signature(Scratch().forward).parameters) == ["x", "scale"]


@pytest.mark.pools
def test_bare_function_and_keywords():
    @poolscope.pooled_forward(threshold="4MiB", name="big-only")
    def make(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.uint8)

    before = _pool_misses_and_hits()
    make(4 * MiB)
    make(4 * MiB - 1)
    assert _pool_misses_and_hits() - before == 1
    assert make.__name__ == "make"


@pytest.mark.pools
def test_staticmethod_and_classmethod():
    class Holder:
        enable_memory_pool = True

        @poolscope.pooled_forward
        @staticmethod
        def static(n):
            return torch.ones(n)

        @poolscope.pooled_forward
        @classmethod
        def klass(cls, n):
            return cls.__name__, torch.ones(n)

        @classmethod
        @poolscope.pooled_forward
        def klass_outer(cls, n):
            return cls.__name__, torch.ones(n)

    before = _pool_misses_and_hits()
    assert torch.equal(Holder.static(MiB), torch.ones(MiB))
    assert torch.equal(Holder().static(MiB), torch.ones(MiB))
    name, t = Holder.klass(MiB)
    assert name == "Holder" and torch.equal(t, torch.ones(MiB))
    name, t = Holder().klass_outer(MiB)
    assert name == "Holder"
    assert _pool_misses_and_hits() - before == 4


def test_class_and_instance_are_rejected_with_advice():
    with pytest.raises(TypeError, match=r"not the class Scratch; decorate its forward"):
        poolscope.pooled_forward(Scratch)
    with pytest.raises(TypeError, match=r"needs a function or method; got 3"):
        poolscope.pooled_forward(3)


def test_each_call_gets_a_fresh_scope_and_exceptions_propagate():
    @poolscope.pooled_forward
    def boom():
        torch.zeros(MiB)
        raise ValueError("inside")

    for _ in range(2):
        with pytest.raises(ValueError, match="inside"):
            boom()


def test_pool_scope_as_decorator():
    @poolscope.pool_scope(threshold=0)
    def f():
        return torch.ones(10)

    assert torch.equal(f(), torch.ones(10))
    assert torch.equal(f(), torch.ones(10))
