from __future__ import annotations

import gc

import pytest
import torch

import poolscope
from poolscope._engine import engine_for

ENGINE = poolscope.engine()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def pool() -> poolscope.TensorPool:
    """A private CPU pool, so that figures are not shared with other tests."""
    p = poolscope.TensorPool("cpu")
    yield p
    gc.collect()
    assert p.stats().bytes_in_use == 0, "a test left pooled tensors alive"
    p.empty_cache()


def open_scopes() -> int:
    """Scopes open on the calling thread (native engine)."""
    engine = engine_for(torch.device("cpu"))
    return engine.module.thread_depth() if ENGINE == "native" else 0


@pytest.fixture(autouse=True)
def _no_scope_left_behind():
    before = open_scopes()
    yield
    assert open_scopes() == before, "a test left a scope open"
