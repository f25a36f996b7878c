"""The native engine: poolscope's C++ allocator (``csrc/``) behind the engine boundary.

Its ``Pool`` and ``Scope`` classes implement :class:`~poolscope.engines.base.PoolBackend`
and :class:`~poolscope.engines.base.ScopeBackend` directly (``csrc/bindings.cpp`` converts
the options and figures); this module loads the extension (``build.py``) and installs the
allocator when the first scope is made.
"""

from __future__ import annotations

from typing import Any

import torch

from .._errors import PoolscopeError
from . import build
from .base import PoolLimits, ScopeOptions

__all__ = ["NativeEngine"]


class NativeEngine:
    name = "native"

    def __init__(self) -> None:
        self.module = build.load()  # BuildError when it cannot be built here
        self._installed = False

    @property
    def enter_then(self) -> Any:
        return self.module.enter_then

    @property
    def exit_then(self) -> Any:
        return self.module.exit_then

    def new_pool(self, device: torch.device, limits: PoolLimits) -> Any:
        return self.module.Pool(str(device), limits)

    def new_scope(self, pool: Any, options: ScopeOptions) -> Any:
        if not self._installed or not self.module.installed():
            self._install()
        return self.module.Scope(pool, options)

    def _install(self) -> None:
        if not self.module.install():
            raise PoolscopeError(
                "another CPU allocator replaced poolscope's after it was installed (c10::SetCPUAllocator "
                "with a higher priority), so scopes cannot route allocations; install that allocator "
                "before the first pool_scope, or use POOLSCOPE_ENGINE=passthrough"
            )
        self._installed = True
