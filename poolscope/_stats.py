"""Immutable figures reported by pools and scopes: the one place their names are defined.

Every engine returns these (the native engine builds them in ``csrc/bindings.cpp``), and
``report()`` and the docs use the same names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["LimitRefusal", "PoolStats", "ScopeStats", "hit_rate"]


def hit_rate(hits: int, allocations: int) -> float:
    """Share of routed allocations served from cached memory (0.0 when none)."""
    return hits / allocations if allocations else 0.0


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of one pool's figures.

    Bytes "in use" are the bytes of blocks lent to live tensors (at most 1.25x
    what they asked for, ``bytes_requested``); "cached" bytes are idle blocks
    that may still be resident and can be lent again without page faults;
    ``bytes_reserved`` is their sum (blocks a thread keeps for its next lends
    count as cached: a snapshot gives them back to the pool first). ``peak_bytes_in_use``
    is exact for one thread; with several, it may count blocks other threads
    kept for their next lends (at most 32 MiB each). Cached memory that no allocation reused
    during the last ``release_after`` outermost-scope exits goes back to the
    system (``bytes_released_by_exits``), and so does memory nothing used for
    ``release_idle_s`` seconds (``bytes_released_by_time``); ``bytes_released``
    and ``releases`` count every release, caps, growth and ``empty_cache`` included.
    ``working_set_bytes`` is a figure only: the most bytes in use between two
    outermost exits, over the last ``hold_after`` of them. ``fallbacks``
    counts requests the ordinary allocator served because the pool could not grow.

    What the retention policy decided (docs/memory.md): ``release_after`` and
    ``release_idle_s`` are the settings, ``hold_after`` and ``hold_idle_s`` the
    clocks in force now, longer than the settings when a ``learning`` pool saw
    the traffic come back for memory they had released. ``refaults`` counts
    lends that faulted in memory the clocks had released (``bytes_refaulted``
    of it); ``bytes_released_by_pressure`` what low memory gave back at once.
    """

    device: str
    bytes_in_use: int
    bytes_requested: int
    bytes_cached: int
    bytes_reserved: int
    peak_bytes_in_use: int
    blocks_in_use: int
    blocks_cached: int
    segments: int
    hits: int
    misses: int
    releases: int
    bytes_released: int
    bytes_released_by_exits: int
    bytes_released_by_time: int
    fallbacks: int
    working_set_bytes: int
    max_cached_bytes: Optional[int]
    max_bytes: Optional[int]
    release_after: int
    release_idle_s: Optional[float]
    bytes_released_by_pressure: int = 0
    refaults: int = 0
    bytes_refaulted: int = 0
    hold_after: int = 0
    hold_idle_s: Optional[float] = None
    learning: bool = False

    @property
    def evictions(self) -> int:
        """Deprecated name of ``releases`` (until poolscope 0.3)."""
        warnings.warn("PoolStats.evictions is now PoolStats.releases; evictions goes in poolscope 0.3",
                      DeprecationWarning, stacklevel=2)
        return self.releases


@dataclass(frozen=True)
class ScopeStats:
    """What one scope routed: live while it is active, final once it has exited.

    A scope counts every pooled allocation its thread made while it was
    active, nested scopes' included. ``escaped`` counts pooled tensors still
    alive when it exited (a forward's output is one); they stay valid and
    their blocks return when they die. ``bytes_in_use`` is what is alive now
    (at exit, once exited) and ``peak_bytes_in_use`` the most that was alive at
    once (``PoolScope.reset_peak`` restarts it). ``fallbacks`` counts
    allocations the ordinary allocator served instead (``on_limit="fallback"``,
    or a pool that could not grow); ``alloc_seconds`` is time spent in the pool
    (every miss timed; hits estimated from a scope's first and every 16th).
    """

    name: Optional[str]
    allocations_routed: int = 0
    bytes_routed: int = 0
    hits: int = 0
    misses: int = 0
    fallbacks: int = 0
    escaped: int = 0
    bytes_in_use: int = 0
    peak_bytes_in_use: int = 0
    alloc_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Share of routed allocations served from cached memory (0.0 when none)."""
        return hit_rate(self.hits, self.allocations_routed)


@dataclass(frozen=True)
class LimitRefusal:
    """A scope's last allocation refused past a ``max_bytes``: what the error says, and what was alive.

    ``serial`` is unique in the process and ends the ``torch.OutOfMemoryError`` message the
    refusal raised (``[poolscope refusal #N]``), so a scope tells its own refusal apart from
    any other out-of-memory error by number.
    """

    serial: int
    message: str
    blocks: list[dict[str, Any]] = field(default_factory=list)
