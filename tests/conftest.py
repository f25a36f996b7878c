from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
import torch

import poolscope
from poolscope.engines import engine_for

# scripts/test runs the suite against the installed package; it sets this to the checkout.
_CHECKOUT = os.environ.get("POOLSCOPE_TEST_CHECKOUT")
if _CHECKOUT and Path(poolscope.__file__).resolve().is_relative_to(Path(_CHECKOUT, "poolscope").resolve()):
    raise pytest.UsageError(
        f"the suite must test the installed poolscope, but imported the checkout's {poolscope.__file__}"
    )

ENGINE = poolscope.engine()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# Plain PyTorch before 2.6 refuses torch.compile on Python 3.13, and its multiprocessing spawn
# breaks there ('persistent_id' is read-only): tests of those features cannot run on such a pair.
_OLD_TORCH_NEW_PYTHON = sys.version_info >= (3, 13) and tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 6)
needs_compile = pytest.mark.skipif(_OLD_TORCH_NEW_PYTHON, reason="torch < 2.6 has no torch.compile on Python 3.13")
needs_spawn = pytest.mark.skipif(_OLD_TORCH_NEW_PYTHON, reason="torch < 2.6 cannot spawn processes on Python 3.13")


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
    return engine.module._test.thread_depth() if ENGINE == "native" else 0


@pytest.fixture(autouse=True)
def _no_scope_left_behind():
    before = open_scopes()
    yield
    assert open_scopes() == before, "a test left a scope open"
