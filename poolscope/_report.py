"""Figures of named scopes, accumulated across calls, and the table ``report()`` prints."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass

from ._errors import PoolscopeWarning
from ._stats import ScopeStats

__all__ = ["record", "report", "reset_report", "report_rows"]

IDLE_CALLS_WARNING = 100  # a named scope that routed nothing in this many calls is suspicious


@dataclass
class ReportRow:
    name: str
    calls: int = 0
    allocations_routed: int = 0
    bytes_routed: int = 0
    hits: int = 0
    peak_bytes_in_use: int = 0
    escaped: int = 0
    alloc_seconds: float = 0.0
    warned_idle: bool = False

    @property
    def hit_rate(self) -> float:
        return self.hits / self.allocations_routed if self.allocations_routed else 0.0


_lock = threading.Lock()
_rows: dict[str, ReportRow] = {}


def record(stats: ScopeStats, threshold: int) -> None:
    """Add one finished call of a named scope to the report."""
    if stats.name is None:
        return
    with _lock:
        row = _rows.get(stats.name)
        if row is None:
            row = _rows[stats.name] = ReportRow(stats.name)
        row.calls += 1
        row.allocations_routed += stats.allocations_routed
        row.bytes_routed += stats.bytes_routed
        row.hits += stats.hits
        row.peak_bytes_in_use = max(row.peak_bytes_in_use, stats.peak_bytes_in_use)
        row.escaped += stats.escaped
        row.alloc_seconds += stats.alloc_seconds
        warn_idle = row.calls >= IDLE_CALLS_WARNING and row.allocations_routed == 0 and not row.warned_idle
        if warn_idle:
            row.warned_idle = True
    if warn_idle:
        warnings.warn(
            f"scope {stats.name!r} ran {row.calls} times and routed nothing: every allocation it made was "
            f"below threshold={threshold} bytes; lower the threshold or drop the scope",
            PoolscopeWarning,
            stacklevel=4,
        )


def report_rows() -> list[ReportRow]:
    """Copies of the rows, largest bytes routed first."""
    with _lock:
        rows = [ReportRow(**vars(r)) for r in _rows.values()]
    return sorted(rows, key=lambda r: (-r.bytes_routed, r.name))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def report() -> str:
    """Return a table of every named scope's figures, largest bytes routed first.

    Scopes are named by ``pool_scope(name=...)``; decorated forwards are named
    after the function's qualified name. Counting is always on.

    Example::

        for _ in range(10):
            model(x)                     # forward decorated with @pooled_forward
        print(poolscope.report())

    Returns:
        The table as a string (a header line only when nothing was recorded).
    """
    header = ("scope", "calls", "routed", "MiB routed", "hit rate", "peak MiB", "escaped", "alloc ms")
    lines = [
        (
            r.name,
            str(r.calls),
            str(r.allocations_routed),
            _mib(r.bytes_routed),
            f"{r.hit_rate:.0%}",
            _mib(r.peak_bytes_in_use),
            str(r.escaped),
            f"{r.alloc_seconds * 1e3:.1f}",
        )
        for r in report_rows()
    ]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join((first, *rest))

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])


def reset_report() -> None:
    """Forget every named scope's accumulated figures."""
    with _lock:
        _rows.clear()
