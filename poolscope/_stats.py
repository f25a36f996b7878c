"""Immutable figures reported by pools and scopes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of one pool's figures.

    Bytes "in use" are the size-class bytes of blocks lent to live tensors;
    ``bytes_requested`` is what those tensors asked for (at most 1.25x less).
    ``fallbacks`` counts requests the pool could not grow for, which PyTorch's
    ordinary allocator served instead.
    """

    device: str
    bytes_in_use: int
    bytes_requested: int
    bytes_cached: int
    bytes_reserved: int
    peak_bytes_in_use: int
    blocks_in_use: int
    blocks_cached: int
    hits: int
    misses: int
    evictions: int
    fallbacks: int
    max_cached_bytes: int | None
    max_bytes: int | None


@dataclass(frozen=True)
class ScopeStats:
    """What one scope routed; final once the scope has exited.

    ``escaped`` counts pooled tensors still alive when the scope exited, such
    as a forward's output. They stay valid; their blocks return when they die.
    ``peak_bytes_in_use`` is the most block bytes this scope's tensors held at
    once; ``alloc_seconds`` the time spent getting them from the pool.
    """

    name: str | None
    allocations_routed: int = 0
    bytes_routed: int = 0
    hits: int = 0
    misses: int = 0
    escaped: int = 0
    peak_bytes_in_use: int = 0
    alloc_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        """Share of routed allocations served from cached blocks (0.0 when none)."""
        return self.hits / self.allocations_routed if self.allocations_routed else 0.0
