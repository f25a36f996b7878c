"""``compare``: does a scope help this call? Plain and pooled, alternating, in one process.

A first timing loop on a shared machine swings by 30% either way; what answers the question is
the two ways measured in turn (the machine's drift slows both alike), medians, page faults per
call (the cost a pool removes), the outputs compared bit for bit, and, when there is no win, the
reason: nothing reached the threshold, the bytes fell below it, or the call is compute-bound.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ._config import DEFAULT_THRESHOLD, parse_choice
from ._errors import PoolscopeTypeError, PoolscopeValueError
from ._pool import TensorPool
from ._options import scope_options
from ._scope import PoolScope

__all__ = ["Comparison", "compare"]

CONTEXTS = ("inference_mode", "no_grad", "grad")
_WIN = 1.03  # a median ratio past this, in most rounds, is a win (below 1 / _WIN a loss)
_SMALL = 64 << 10  # allocation bands: below 64 KiB, 64 KiB to the threshold, the threshold and up


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` measured; ``print()`` it for a short table.

    Times are medians over the timed rounds, per call, in ms; ``*_spread_ms`` the fastest and
    slowest call. ``speedup`` is plain's median time over pooled's (above 1: pooled is
    faster); ``ratios`` the per-round plain/pooled ratios it is the median of. ``faults_*``
    are minor page faults per call (median; the process's, all its threads). ``peak_rss_*_mib``
    the process's resident memory at its highest during a call (median over calls).
    ``identical`` says whether the outputs of a plain and a pooled call with the same RNG state
    were bit-identical. ``hit_rate`` and ``routed_per_call`` are the pool's figures over the timed
    pooled calls. ``bytes_by_band`` the bytes one call allocates on the CPU, by size (below
    64 KiB, 64 KiB up to the threshold, the threshold and up), from torch.profiler.
    ``allocation_share`` estimates the share of a plain call's time that its page faults take.
    ``verdict`` says what it means, in one line, with its reason.
    """

    speedup: float
    identical: bool
    faults_plain: float
    faults_pooled: float
    verdict: str
    plain_ms: float
    pooled_ms: float
    plain_spread_ms: tuple[float, float]
    pooled_spread_ms: tuple[float, float]
    ratios: list[float]
    peak_rss_plain_mib: float
    peak_rss_pooled_mib: float
    hit_rate: float
    routed_per_call: float
    bytes_by_band: dict[str, int]
    allocation_share: float
    rounds: int
    context: str
    threshold: int
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        rows = [
            ("", "plain", "pooled"),
            ("median ms per call", f"{self.plain_ms:.1f}", f"{self.pooled_ms:.1f}"),
            ("fastest - slowest ms", _span(self.plain_spread_ms), _span(self.pooled_spread_ms)),
            ("page faults per call", f"{self.faults_plain:.0f}", f"{self.faults_pooled:.0f}"),
            ("peak RSS MiB", f"{self.peak_rss_plain_mib:.0f}", f"{self.peak_rss_pooled_mib:.0f}"),
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join((r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].rjust(widths[2]))) for r in rows]
        bands = ", ".join(f"{name} {_mib(n)} MiB" for name, n in self.bytes_by_band.items())
        lines += [
            f"speedup {self.speedup:.2f}x (median of {self.rounds} rounds, {self.context}); outputs bit-identical: "
            f"{'yes' if self.identical else 'NO'}",
            f"pool: {self.routed_per_call:.0f} allocations routed per call, hit rate {self.hit_rate:.0%}; "
            f"allocated per call: {bands}",
            f"verdict: {self.verdict}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _span(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.1f} - {pair[1]:.1f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reset_peak_rss() -> bool:
    """Restart the kernel's high-water mark of resident memory (Linux 4.0+); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return math.nan


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    return []


def _same(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.dtype != y.dtype or x.shape != y.shape or x.device != y.device:
            return False
        xb, yb = x.detach().contiguous().reshape(-1), y.detach().contiguous().reshape(-1)
        if xb.numel() and not torch.equal(xb.view(torch.uint8), yb.view(torch.uint8)):
            return False
    return True if ta else a == b


def _scope(options: dict[str, Any]) -> PoolScope:
    """A scope of compare's own: out of ``report()``, its exits not counted toward retention."""
    return PoolScope(scope_options(**{"threshold": DEFAULT_THRESHOLD, **options}, counts_exits=False))


def _bands(call: Callable[[], Any], threshold: int) -> dict[str, int]:
    """Bytes one call allocates on the CPU, by size band.

    The call runs once in a scope that routes every allocation (threshold 0) to a private pool
    that records each one; sizes are the blocks lent (requests rounded up to 512 bytes).
    """
    below = f"64 KiB to {_mib(threshold)} MiB" if threshold > _SMALL else "below threshold"
    names = ["below 64 KiB", below, f"{_mib(threshold)} MiB and up"]
    bands = dict.fromkeys(names, 0)
    recorder = TensorPool("cpu", release_idle_s=None)
    with _scope({"pool": recorder, "threshold": 0, "enable_profiling": True}):
        out = call()
    del out
    for event in recorder.trace():
        if event["action"] == "alloc":
            size = event["size"]
            bands[names[0 if size < min(_SMALL, threshold) else 1 if size < threshold else 2]] += size
    recorder.empty_cache()
    return bands


def _fault_cost_s() -> float:
    """Seconds one minor fault costs here: fresh anonymous pages written, against the same pages again."""
    size = 32 << 20
    costs = []
    for _ in range(3):
        with mmap.mmap(-1, size) as memory:
            pages = torch.frombuffer(memory, dtype=torch.uint8)
            before, start = _minor_faults(), time.perf_counter()
            pages.fill_(1)
            fresh, faults = time.perf_counter() - start, _minor_faults() - before
            start = time.perf_counter()
            pages.fill_(2)
            warm = time.perf_counter() - start
            del pages
        if faults > 0:
            costs.append(max(fresh - warm, 0.0) / faults)
    return statistics.median(costs) if costs else 0.0


def _verdict(
    *, identical: bool, ratios: list[float], routed: float, faults_plain: float, faults_pooled: float,
    bands: dict[str, int], threshold: int, allocation_share: float,
) -> str:
    """One line: what the figures mean, with the reason (a pure function of the figures, tested alone)."""
    if not identical:
        return (
            "outputs differ between the plain and the pooled call with the same RNG state: the call is not "
            "deterministic (threads racing, a clock, state kept between calls), or report a poolscope bug"
        )
    speedup = statistics.median(ratios)
    faster = sum(r > 1 for r in ratios) / len(ratios)
    total = sum(bands.values())
    large = list(bands.values())[2]
    below = total - large
    if routed == 0:
        if total == 0:
            return "no win: the call allocates no CPU memory that poolscope could pool (is it on another device?)"
        return (
            f"no win: nothing was pooled: all {_mib(total)} MiB it allocates per call come in pieces below the "
            f"threshold of {_mib(threshold)} MiB; lower the threshold only if those pieces are near it"
        )
    why = []
    if below > large:
        why.append(
            f"{below / total:.0%} of the bytes it allocates fall below the {_mib(threshold)} MiB threshold"
        )
    if allocation_share < 0.05:
        why.append(f"the call is compute-bound: page faults are about {allocation_share:.0%} of its time")
    fault_note = f"page faults per call {faults_plain:.0f} plain, {faults_pooled:.0f} pooled"
    if speedup >= _WIN and faster >= 0.75:
        return f"faster: {speedup:.2f}x, {fault_note}"
    if speedup <= 1 / _WIN and faster <= 0.25:
        return f"slower: {speedup:.2f}x, {fault_note}; " + ("; ".join(why) or "the pooled calls cost more here")
    reason = "; ".join(why) or (
        "what it saves is within this machine's noise" if faults_pooled < faults_plain else
        "it pooled allocations but saved no page faults (the C library already reuses this memory)"
    )
    return f"no measurable difference ({speedup:.2f}x, faster in {faster:.0%} of rounds): {reason}; {fault_note}"


def compare(
    fn: Callable[..., Any],
    *args: Any,
    calls: int = 10,
    warmup: int = 2,
    context: str = "inference_mode",
    scope_kwargs: Optional[dict[str, Any]] = None,
    budget_s: float = 120.0,
    **kwargs: Any,
) -> Comparison:
    """Run ``fn(*args, **kwargs)`` plain and inside a pool scope, alternating, and say whether the scope helps.

    After ``warmup`` calls each way (the first pooled calls fill the pool), it makes up to
    ``calls`` rounds of one plain and one pooled call, the first mover alternating, within
    ``budget_s`` seconds (at least 3 rounds). It counts page faults and peak RSS per call,
    checks that a plain and a pooled call from the same RNG state give bit-identical outputs,
    profiles one call's allocations by size, and writes a one-line verdict with its reason.

    Example::

        model = transformers.AutoModel.from_config(config).eval()
        result = poolscope.compare(model, input_ids, calls=10)
        print(result)                     # table and verdict
        result.speedup, result.faults_plain, result.faults_pooled, result.identical

    Args:
        fn: the call to measure (a model, its forward, any function); it runs many times.
        args, kwargs: its arguments. (An argument of ``fn`` named like one of the options
            below must be passed through a lambda.)
        calls: timed rounds (each one plain call and one pooled call).
        warmup: untimed calls each way first.
        context: ``"inference_mode"`` (the default), ``"no_grad"`` or ``"grad"`` (autograd on).
        scope_kwargs: keyword arguments for :func:`pool_scope` (``threshold``, ``pool``...);
            compare's scopes stay out of :func:`report`.
            Unless it names a pool, a private pool that gives nothing back by time serves the
            pooled calls, so that the plain calls between them do not count as idle time.
        budget_s: stop the timed rounds after this many seconds (at least 3 rounds run).

    Returns:
        A :class:`Comparison`.

    Raises:
        PoolscopeTypeError, PoolscopeValueError: for a bad option.

    Limits:
        CPU only: times are wall clock of this process, faults its minor page faults (all
        threads). One process: an allocator's state carries from plain calls to pooled ones
        and back, as in a real program that uses scopes in part of its work.
    """
    if not callable(fn):
        raise PoolscopeTypeError(f"compare needs a callable to measure; got {fn!r} of type {type(fn).__name__}")
    for name, value, least in (("calls", calls, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise PoolscopeValueError(f"{name} must be an int >= {least}; got {value!r}")
    parse_choice(context, "context", CONTEXTS)
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise PoolscopeValueError(f"budget_s must be a number of seconds > 0; got {budget_s!r}")
    options = dict(scope_kwargs or {})
    if "pool" not in options:
        options["pool"] = TensorPool("cpu", release_idle_s=None)
    threshold = _scope(options).threshold  # a bad scope argument fails here, naming it

    def guarded() -> contextlib.AbstractContextManager[Any]:
        if context == "inference_mode":
            return torch.inference_mode()
        return torch.no_grad() if context == "no_grad" else contextlib.nullcontext()

    def plain() -> Any:
        with guarded():
            return fn(*args, **kwargs)

    routed = [0, 0]  # allocations routed, hits, over the timed pooled calls

    def pooled(count: bool = False) -> Any:
        with guarded(), _scope(options) as scope:
            out = fn(*args, **kwargs)
        if count:
            routed[0] += scope.stats.allocations_routed
            routed[1] += scope.stats.hits
        return out

    # Identity: the same RNG state each way.
    rng = torch.get_rng_state()
    expected = plain()
    torch.set_rng_state(rng)
    identical = _same(expected, pooled())
    del expected
    for _ in range(warmup):
        plain()
        pooled()

    times: dict[str, list[float]] = {"plain": [], "pooled": []}
    faults: dict[str, list[int]] = {"plain": [], "pooled": []}
    peaks: dict[str, list[float]] = {"plain": [], "pooled": []}
    peaks_known = _reset_peak_rss()
    started = time.monotonic()
    rounds = 0
    while rounds < calls and (rounds < 3 or time.monotonic() - started < budget_s):
        order = ("plain", "pooled") if rounds % 2 == 0 else ("pooled", "plain")
        for way in order:
            _reset_peak_rss()
            before, start = _minor_faults(), time.perf_counter()
            out = plain() if way == "plain" else pooled(count=True)
            times[way].append(time.perf_counter() - start)
            faults[way].append(_minor_faults() - before)
            peaks[way].append(_peak_rss() if peaks_known else math.nan)
            del out
        rounds += 1

    bands = _bands(plain, threshold)  # plain: pooled blocks are not reported to the profiler
    plain_median = statistics.median(times["plain"])
    faults_plain = float(statistics.median(faults["plain"]))
    faults_pooled = float(statistics.median(faults["pooled"]))
    share = min(1.0, faults_plain * _fault_cost_s() / plain_median) if plain_median > 0 else 0.0
    ratios = [p / q if q > 0 else math.inf for p, q in zip(times["plain"], times["pooled"])]
    verdict = _verdict(
        identical=identical, ratios=ratios, routed=routed[0] / rounds, faults_plain=faults_plain,
        faults_pooled=faults_pooled, bands=bands, threshold=threshold, allocation_share=share,
    )
    notes = [] if peaks_known else ["peak RSS unknown: /proc/self/clear_refs cannot be written here"]
    return Comparison(
        speedup=statistics.median(ratios),
        identical=identical,
        faults_plain=faults_plain,
        faults_pooled=faults_pooled,
        verdict=verdict,
        plain_ms=plain_median * 1e3,
        pooled_ms=statistics.median(times["pooled"]) * 1e3,
        plain_spread_ms=(min(times["plain"]) * 1e3, max(times["plain"]) * 1e3),
        pooled_spread_ms=(min(times["pooled"]) * 1e3, max(times["pooled"]) * 1e3),
        ratios=ratios,
        peak_rss_plain_mib=statistics.median(peaks["plain"]) / 2**20,
        peak_rss_pooled_mib=statistics.median(peaks["pooled"]) / 2**20,
        hit_rate=routed[1] / routed[0] if routed[0] else 0.0,
        routed_per_call=routed[0] / rounds,
        bytes_by_band=bands,
        allocation_share=share,
        rounds=rounds,
        context=context,
        threshold=threshold,
        notes=notes,
    )

