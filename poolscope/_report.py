"""Figures of named scopes, accumulated across calls, and the table ``report()`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ._diagnostics import warn_at_caller
from ._forksafe import ForkSafeLock
from ._pool import all_pools
from ._stats import ScopeStats, hit_rate

__all__ = ["record", "report", "reset_report", "report_rows"]

IDLE_CALLS_WARNING = 100  # a named scope that routed nothing in this many calls is suspicious
UNNAMED = "(unnamed)"  # the row of every scope without a name


@dataclass
class ReportRow:
    name: str
    calls: int = 0
    allocations_routed: int = 0
    bytes_routed: int = 0
    hits: int = 0
    fallbacks: int = 0
    peak_bytes_in_use: int = 0
    escaped: int = 0
    alloc_seconds: float = 0.0
    warned_idle: bool = False
    escapes: list[Any] = field(default_factory=list)  # backends of calls whose tensors are still alive

    def bytes_in_use(self) -> int:
        """Pooled bytes lent during this scope's calls that are still alive."""
        alive = [(b, b.stats().bytes_in_use) for b in self.escapes]
        self.escapes = [b for b, n in alive if n]
        return sum(n for _, n in alive)


_lock = ForkSafeLock()
_rows: dict[str, ReportRow] = {}


def record(stats: ScopeStats, threshold: int, backend: Any) -> None:
    """Add one finished call of a scope to the report (scopes without a name share one row)."""
    name = UNNAMED if stats.name is None else stats.name
    with _lock:
        row = _rows.get(name)
        if row is None:
            row = _rows[name] = ReportRow(name)
        row.calls += 1
        row.allocations_routed += stats.allocations_routed
        row.bytes_routed += stats.bytes_routed
        row.hits += stats.hits
        row.fallbacks += stats.fallbacks
        row.peak_bytes_in_use = max(row.peak_bytes_in_use, stats.peak_bytes_in_use)
        row.escaped += stats.escaped
        row.alloc_seconds += stats.alloc_seconds
        if stats.bytes_in_use:
            row.escapes.append(backend)
            if len(row.escapes) > 64:
                row.bytes_in_use()  # drop calls whose tensors have died since
        warn_idle = (
            stats.name is not None and row.calls >= IDLE_CALLS_WARNING and row.allocations_routed == 0 and not row.warned_idle
        )
        if warn_idle:
            row.warned_idle = True
    if warn_idle:
        warn_at_caller(
            f"scope {stats.name!r} ran {row.calls} times and pooled nothing: every allocation its thread made "
            f"inside it was smaller than threshold={threshold} bytes. If its large tensors are smaller than that, "
            f"lower the threshold (e.g. threshold='256KiB'); if it has no large tensors, it gains nothing from a scope"
        )


def report_rows() -> list[ReportRow]:
    """The rows, largest bytes routed first."""
    with _lock:
        rows = list(_rows.values())
    return sorted(rows, key=lambda r: (-r.bytes_routed, r.name))


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def report() -> str:
    """Return a table of every named scope's figures, largest bytes routed first.

    Scopes are named by ``pool_scope(name=...)``; decorated forwards are named
    after the function's qualified name; scopes without a name share the row
    ``(unnamed)``. Counting is always on, per process: a forked or spawned child
    (a DataLoader worker) counts in its own report, not its parent's.

    Example::

        for _ in range(10):
            model(x)                     # forward decorated with @pooled_forward
        print(poolscope.report())

    Columns: calls; allocations routed and their MiB; hit rate (served from
    cached memory); peak MiB (the most pooled bytes alive at once in any one
    call, nested scopes included); live MiB (pooled bytes from all finished
    calls still alive now, summed over calls: outputs you kept, so it can
    exceed one call's peak); escaped (tensors alive at a call's exit, summed);
    fallbacks (served by the ordinary allocator); alloc ms (time in the pool).
    Under the table, one line per pool that released memory to the system:
    what it holds cached now, what no allocation reused for ``hold_after``
    exits, what sat idle for ``hold_idle_s`` seconds and what low memory took
    (the clocks in force now), how much of it lends faulted in again, and
    whether the clocks learned longer holds than their settings.

    Returns:
        The table as a string (a header line only when nothing was recorded).
    """
    header = ("scope", "calls", "routed", "MiB routed", "hit rate", "peak MiB", "live MiB", "escaped", "fallbacks", "alloc ms")
    lines = [
        (
            r.name,
            str(r.calls),
            str(r.allocations_routed),
            _mib(r.bytes_routed),
            f"{hit_rate(r.hits, r.allocations_routed):.0%}",
            _mib(r.peak_bytes_in_use),
            _mib(r.bytes_in_use()),
            str(r.escaped),
            str(r.fallbacks),
            f"{r.alloc_seconds * 1e3:.1f}",
        )
        for r in report_rows()
    ]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(header)]

    def fmt(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:]))
        return "  ".join((first, *rest))

    table = [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)]
    return "\n".join(table + _released_lines())


def _released_lines() -> list[str]:
    """One line per pool that released memory by its clocks or under pressure (none otherwise)."""
    lines = []
    for pool in all_pools():
        s = pool.stats()
        if not (s.bytes_released_by_exits or s.bytes_released_by_time or s.bytes_released_by_pressure):
            continue
        line = (
            f"pool {s.device}: {_mib(s.bytes_cached)} MiB cached; released {_mib(s.bytes_released_by_exits)} MiB "
            f"by the exits clock, {_mib(s.bytes_released_by_time)} MiB by the idle clock"
        )
        if s.bytes_released_by_pressure:
            line += f", {_mib(s.bytes_released_by_pressure)} MiB under memory pressure"
        lends = "lend" if s.refaults == 1 else "lends"
        line += f"; {s.refaults} {lends} faulted {_mib(s.bytes_refaulted)} MiB of it in again"
        line += f"; clocks {s.hold_after} exits and {_seconds(s.hold_idle_s)}"
        if not s.learning:
            line += " (fixed)"
        elif (s.hold_after, s.hold_idle_s) != (s.release_after, s.release_idle_s):
            line += f" (learned; settings {s.release_after} exits and {_seconds(s.release_idle_s)})"
        else:
            line += " (learning)"
        lines.append(line)
    return lines


def _seconds(value: Optional[float]) -> str:
    return "never" if value is None else f"{value:g} s"


def reset_report() -> None:
    """Forget every named scope's accumulated figures."""
    with _lock:
        _rows.clear()
