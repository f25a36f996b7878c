"""The passthrough engine: scopes that route nothing and pools that stay empty.

It serves devices without a native route and machines where the native engine cannot be
built, so that code written with poolscope runs unchanged, unpooled.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from .._stats import LimitRefusal, PoolStats, ScopeStats
from .base import PoolLimits, PythonPushPop, ScopeOptions

__all__ = ["ENGINE"]


class _Pool:
    def __init__(self, device: torch.device, limits: PoolLimits) -> None:
        self._device = str(device)
        self._limits = limits

    def configure(self, limits: PoolLimits) -> None:
        self._limits = limits

    def stats(self) -> PoolStats:
        return empty_pool_stats(self._device, self._limits)

    def release(self, everything: bool) -> None:
        pass

    def segments(self) -> list[dict[str, Any]]:
        return []

    def trace(self) -> list[dict[str, Any]]:
        return []


def empty_pool_stats(device: str, limits: PoolLimits, **figures: int) -> PoolStats:
    """The figures of a pool that holds nothing, but ``figures`` and its limits."""
    zero: dict[str, Any] = dict.fromkeys(
        "bytes_in_use bytes_requested bytes_cached bytes_reserved peak_bytes_in_use blocks_in_use blocks_cached "
        "segments hits misses releases bytes_released bytes_released_by_exits bytes_released_by_time fallbacks "
        "working_set_bytes".split(),
        0,
    )
    return PoolStats(
        device=device, **{**zero, **figures}, max_cached_bytes=limits.max_cached_bytes, max_bytes=limits.max_bytes,
        release_after=limits.release_after, release_idle_s=limits.release_idle_s,
        hold_after=limits.release_after, hold_idle_s=limits.release_idle_s,
    )


class _Scope:
    def __init__(self, name: Optional[str]) -> None:
        self._name = name
        self._owner: Optional[int] = None

    def enter(self) -> None:
        self._owner = threading.get_ident()

    def exit(self) -> str:
        if self._owner is None:
            return "not_active"
        self._owner = None  # from any thread: it routes nothing, so closing changes nothing else
        return "ok"

    def stats(self) -> ScopeStats:
        return ScopeStats(name=self._name)

    def reset_peak(self) -> None:
        pass

    def live_blocks(self) -> list[dict[str, Any]]:
        return []

    def refusal(self) -> Optional[LimitRefusal]:
        return None


class PassthroughEngine(PythonPushPop):
    name = "passthrough"

    def new_pool(self, device: torch.device, limits: PoolLimits) -> _Pool:
        return _Pool(device, limits)

    def new_scope(self, pool: Any, options: ScopeOptions) -> _Scope:
        return _Scope(options.name)


ENGINE = PassthroughEngine()
