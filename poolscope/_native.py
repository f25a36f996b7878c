"""The native engine: poolscope's C++ allocator (``csrc/``) behind the engine boundary.

Its ``Pool`` and ``Scope`` classes implement :class:`~poolscope._engine.PoolBackend`
and :class:`~poolscope._engine.ScopeBackend` directly; this module only loads
the extension and installs the allocator when the first scope is made.
"""

from __future__ import annotations

from typing import Any

import torch

from . import _build
from ._errors import PoolscopeError

__all__ = ["NativeEngine"]


class NativeEngine:
    name = "native"

    def __init__(self) -> None:
        self._module = _build.load()  # BuildError when it cannot be built here
        self._installed = False

    @property
    def enter_then(self) -> Any:
        return self._module.enter_then

    @property
    def exit_then(self) -> Any:
        return self._module.exit_then

    def new_pool(
        self, device: torch.device, max_cached: int, max_bytes: int, release_after: int, release_idle_us: int
    ) -> Any:
        return self._module.Pool(str(device), max_cached, max_bytes, release_after, release_idle_us)

    def new_scope(
        self, pool: Any, threshold: int, max_bytes: int, fallback: bool, profiling: bool, name: str, ticks: bool
    ) -> Any:
        if not self._installed or not self._module.installed():
            self._install()
        return self._module.Scope(pool, threshold, max_bytes, fallback, profiling, name, ticks)

    def _install(self) -> None:
        if not self._module.install():
            raise PoolscopeError(
                "another CPU allocator replaced poolscope's after it was installed (c10::SetCPUAllocator "
                "with a higher priority), so scopes cannot route allocations; install that allocator "
                "before the first pool_scope, or use POOLSCOPE_ENGINE=passthrough"
            )
        self._installed = True

    @property
    def module(self) -> Any:
        return self._module
