"""Fails loudly when a torch upgrade moves a private API poolscope relies on."""

from __future__ import annotations

import gc
import weakref

import torch

from poolscope import _torch_compat as compat


def test_private_apis_exist():
    assert compat.torch_version() >= compat.TESTED_TORCH
    assert callable(compat.no_python_dispatch)
    assert set(torch._C._TorchDispatchModeKey.__members__) >= {"FAKE", "PROXY", "FUNCTIONAL"}
    assert compat.infra_mode_active() is False
    assert isinstance(compat.dispatch_mode_stack(), list)
    assert compat.current_stream_key(torch.device("cpu")) == 0


def test_storage_alias_signals_release_exactly_when_the_storage_dies():
    block = torch.zeros(4096, dtype=torch.uint8)
    sentinel = block[:1000]
    fired = []
    ref = weakref.ref(sentinel, lambda r: fired.append(1))
    alias = compat.storage_alias(sentinel)
    del sentinel
    gc.collect()
    assert not fired and alias.untyped_storage().nbytes() == 1000
    assert alias.data_ptr() == block.data_ptr()
    storage = alias.untyped_storage()
    del alias
    assert not fired
    del storage
    assert fired == [1] and ref() is None


def test_dispatch_mode_sees_factories_with_autograd_stripped():
    seen = []

    class Spy(compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append((func, dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    with Spy():
        torch.zeros(3, requires_grad=True)
        torch.randn(3, generator=torch.Generator())
    assert seen[0][0] is torch.ops.aten.zeros.default and "requires_grad" not in seen[0][1]
    assert seen[1][0] is torch.ops.aten.randn.generator
