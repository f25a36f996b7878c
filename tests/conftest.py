from __future__ import annotations

import gc

import pytest
import torch

import poolscope

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def pool() -> poolscope.TensorPool:
    """A private CPU pool, so that figures are not shared with other tests."""
    p = poolscope.TensorPool("cpu")
    yield p
    gc.collect()
    assert p.stats().bytes_in_use == 0, "a test left pooled tensors alive"
    p.empty_cache()


@pytest.fixture(autouse=True)
def _no_scope_left_behind():
    from poolscope._torch_compat import dispatch_mode_stack

    before = len(dispatch_mode_stack())
    yield
    assert len(dispatch_mode_stack()) == before, "a dispatch mode was left on the stack"
    assert poolscope._scope.current_scope() is None
