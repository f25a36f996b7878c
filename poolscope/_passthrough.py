"""The passthrough engine: scopes that route nothing and pools that stay empty.

It serves devices without a native route and machines where the native engine
cannot be built, so that code written with poolscope runs unchanged, unpooled.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from ._engine import PythonPushPop

__all__ = ["ENGINE"]

_POOL_FIGURES = (
    "bytes_in_use bytes_requested bytes_cached bytes_reserved bytes_mapped peak_bytes_in_use blocks_in_use "
    "blocks_cached segments hits misses evictions bytes_released bytes_released_by_exits bytes_released_by_time "
    "fallbacks exits working_set_bytes"
).split()
_SCOPE_FIGURES = (
    "allocations_routed bytes_routed hits misses fallbacks refused bytes_in_use blocks_in_use peak_bytes_in_use"
).split()


class _Pool:
    def __init__(self, max_cached: int, max_bytes: int, release_after: int, release_idle_us: int) -> None:
        self.configure(max_cached, max_bytes, release_after, release_idle_us)

    def configure(self, max_cached: int, max_bytes: int, release_after: int, release_idle_us: int) -> None:
        self._limits = {
            "max_cached_bytes": None if max_cached < 0 else max_cached,
            "max_bytes": None if max_bytes < 0 else max_bytes,
            "release_after": release_after,
            "release_idle_s": None if release_idle_us < 0 else release_idle_us * 1e-6,
        }

    def stats(self) -> dict[str, Any]:
        return {**dict.fromkeys(_POOL_FIGURES, 0), **self._limits}

    def release(self, everything: bool) -> None:
        pass

    def segments(self) -> list[dict[str, Any]]:
        return []

    def trace(self) -> list[dict[str, Any]]:
        return []


class _Scope:
    def __init__(self) -> None:
        self._owner: Optional[int] = None

    def enter(self) -> None:
        self._owner = threading.get_ident()

    def exit(self) -> str:
        if self._owner is None:
            return "not_active"
        if self._owner != threading.get_ident():
            return "wrong_thread"
        self._owner = None
        return "ok"

    def stats(self) -> dict[str, Any]:
        return {**dict.fromkeys(_SCOPE_FIGURES, 0), "alloc_seconds": 0.0}

    def reset_peak(self) -> None:
        pass

    def live_blocks(self) -> list[dict[str, Any]]:
        return []

    def limit_error(self) -> Optional[tuple[str, list[dict[str, Any]]]]:
        return None


class PassthroughEngine(PythonPushPop):
    name = "passthrough"

    def new_pool(
        self, device: torch.device, max_cached: int, max_bytes: int, release_after: int, release_idle_us: int
    ) -> _Pool:
        return _Pool(max_cached, max_bytes, release_after, release_idle_us)

    def new_scope(
        self, pool: Any, threshold: int, max_bytes: int, fallback: bool, profiling: bool, name: str, ticks: bool
    ) -> _Scope:
        return _Scope()


ENGINE = PassthroughEngine()

