"""What the tests share: comparisons (results in a scope must equal results without one, bit for
bit), sizes and paths, and running code in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.to(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same values (bitwise, NaNs included), dtype, shape, strides, device, autograd flags."""
    assert type(a) is type(b)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.stride() == b.stride(), (a.stride(), b.stride())
    assert a.device == b.device
    assert a.requires_grad == b.requires_grad
    assert a.is_leaf == b.is_leaf
    assert a.storage_offset() == b.storage_offset()
    assert a._is_view() == b._is_view()
    assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes()
    assert torch.equal(tensor_bytes(a), tensor_bytes(b))


def assert_same_tree(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert_same(a, b)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    else:
        assert a == b


# --- what many test files share --------------------------------------------------------------

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent  # the checkout (scripts/test runs a copy of it)


def run_python(code: str, cwd: Path = ROOT, *, as_user: bool = False, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; ``as_user``: pick the engine as a user's process does,
    whatever engine this run forces."""
    base = {**os.environ, **({"POOLSCOPE_ENGINE": "", "POOLSCOPE_DISABLE": ""} if as_user else {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={**base, **env}, timeout=600)
