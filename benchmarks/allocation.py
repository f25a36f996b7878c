"""The native engine against its targets: cheap where it cannot help, as fast as the limit where it can.

Each workload runs plain, in poolscope, under glibc's never-give-back tuning (the one-line
competitor), and against the best hand-written alternative where there is one (preallocated
``out=`` buffers, buffers reused by hand). Cases run in child processes, side by side, round
after round (see ``_harness.py``); figures are medians.

Run:  python benchmarks/allocation.py [--rounds 5] [--out benchmarks/results] [--smoke]
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn

from _harness import MiB, scope_for, scoped


# --- workloads (each returns the step to time; the child process calls it) ------------------------


def tiny_ops(mode: str, n: int = 10_000) -> Callable[[], Any]:
    x = torch.randn(16, 16)

    def body() -> None:
        for _ in range(n // 2):
            x.add(1)
            x * 0.5

    return scoped(mode, body)


class DecodeLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, cache: list[torch.Tensor]) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        cache[0] = torch.cat([cache[0], k], dim=2)  # the KV cache grows by one token per step
        cache[1] = torch.cat([cache[1], v], dim=2)
        att = (q @ cache[0].transpose(-1, -2) * (d // self.heads) ** -0.5).softmax(-1) @ cache[1]
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(x)


def decode_body(tokens: int, prompt: int, d: int, layers: int, device: str = "cpu") -> Callable[[], torch.Tensor]:
    """Greedy decoding of ``tokens`` tokens after a ``prompt``-token KV cache (benchmarks/gpu.py reuses it)."""
    torch.manual_seed(0)
    model = nn.ModuleList(DecodeLayer(d, 8) for _ in range(layers)).to(device).eval()
    start = torch.randn(1, 1, d, device=device)
    heads, hd = 8, d // 8

    def body() -> torch.Tensor:
        caches = [[torch.randn(1, heads, prompt, hd, device=device) for _ in range(2)] for _ in range(layers)]
        x = start
        with torch.inference_mode():
            for _ in range(tokens):
                for layer, cache in zip(model, caches):
                    x = layer(x, cache)
        return x

    return body


def decode(mode: str, tokens: int = 48, prompt: int = 1024, d: int = 256, layers: int = 2) -> Callable[[], Any]:
    return scoped(mode, decode_body(tokens, prompt, d, layers))


def attention(mode: str, length: int = 2048, context: str = "inference_mode") -> Callable[[], Any]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    scale = 64**-0.5
    ctx = getattr(torch, context)
    if mode == "out":
        # The same computation as body(), each result written into a buffer made once.
        scores, scaled, probs = (torch.empty(1, 8, length, length) for _ in range(3))
        out = torch.empty_like(q)

        def preallocated() -> torch.Tensor:
            with ctx():
                torch.matmul(q, k.transpose(-1, -2), out=scores)
                torch.mul(scores, scale, out=scaled)
                torch.ops.aten._softmax.out(scaled, -1, False, out=probs)
                return torch.matmul(probs, v, out=out)

        return preallocated

    def body() -> torch.Tensor:
        with ctx():
            return ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v

    return scoped(mode, body)


def handwritten_scratch(mode: str, tokens: int = 65536, width: int = 256) -> Callable[[], Any]:
    """The hand-written pools' pattern: zero-initialised output and scratch buffers every forward."""
    x = torch.randn(tokens)
    if mode == "reuse":
        out, scratch = torch.zeros(tokens, width), torch.zeros(tokens, width)

        def by_hand() -> torch.Tensor:
            out.zero_()
            scratch.zero_()
            scratch.add_(x[:, None])
            return out.add_(scratch)

        return by_hand

    def body() -> torch.Tensor:
        out = torch.zeros(tokens, width)
        scratch = torch.zeros(tokens, width)
        scratch.add_(x[:, None])
        return out.add_(scratch)

    return scoped(mode, body)


def encoder(mode: str, length: int = 4096, d: int = 256, layers: int = 2) -> Callable[[], Any]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 8, dim_feedforward=4 * d, batch_first=True)
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    x = torch.randn(1, length, d)

    def body() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return scoped(mode, body)


def hit_path(mode: str, n: int = 10_000) -> Callable[[], Any]:
    """``torch.empty(1 MiB)`` and its release, ``n`` times (in one scope when pooled: every one a hit)."""

    def body() -> None:
        for _ in range(n):
            torch.empty(MiB, dtype=torch.uint8)

    return scoped(mode, body)


def threads(mode: str, workers: int = 4, iters: int = 200) -> Callable[[], Any]:
    """``workers`` threads, each in a scope of its own when pooled, allocating and touching 4 MiB tensors."""

    def work() -> None:
        with scope_for(mode)():
            for _ in range(iters):
                torch.zeros(MiB).add_(1)

    def body() -> None:
        pool = [threading.Thread(target=work) for _ in range(workers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    if mode == "pooled":
        import poolscope

        with poolscope.pool_scope():  # load and install once, outside the timing
            pass
    return body


def cxx_churn(mode: str, workers: int = 1, n: int = 200_000, size: int = 2 * MiB, raw: bool = False, depth: int = 1,
              inside: bool = True) -> Callable[[], Any]:
    """The engine's own cost from C++ with the GIL released: allocate and free ``size`` bytes
    ``n`` times on each of ``workers`` threads, through PyTorch's CPU allocator. Pooled: each
    thread in ``depth`` nested scopes of its own on one shared pool (``inside``), or outside every
    scope with poolscope installed; plain: poolscope loaded, never installed (the allocator a
    process without poolscope has, or a preloaded one)."""
    import poolscope
    from poolscope.engines import engine_for

    hooks = engine_for(torch.device("cpu")).module._test
    pool = poolscope.TensorPool("cpu", release_idle_s=None)
    backend = None
    if mode == "pooled":
        with poolscope.pool_scope(pool=pool):  # installs
            pass
        backend = pool._backend if inside else None

    def body() -> None:
        hooks.churn(backend, workers, n, size, raw, depth)

    body.pool = pool  # type: ignore[attr-defined]
    return body


class ThreadRun(NamedTuple):
    """What one serving thread's call took: wall and CPU time, waits (it blocked) and
    preemptions (the scheduler took its core away)."""

    wall_s: float
    cpu_s: float
    waits: int
    preemptions: int


class _ServingThread:
    """A thread that lives through the whole measurement and runs what it is handed, as a
    server's threads do: the two-thread ratios compare the same two threads running one at a time
    and at once (a thread made per call would be compared with the caller, with a new stack, heap
    arena and empty held blocks, and pay its start in the figure)."""

    def __init__(self) -> None:
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.fn: Callable[[], Any] = lambda: None
        self.run = ThreadRun(0.0, 0.0, 0, 0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import resource
        import time

        while True:
            self.go.acquire()
            before = resource.getrusage(resource.RUSAGE_THREAD)
            cpu, wall = time.thread_time(), time.perf_counter()
            self.fn()  # a C++ loop that releases the GIL
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            after = resource.getrusage(resource.RUSAGE_THREAD)
            self.run = ThreadRun(wall, cpu, after.ru_nvcsw - before.ru_nvcsw, after.ru_nivcsw - before.ru_nivcsw)
            self.done.release()


def _steal() -> tuple[int, int]:
    """(steal, all) CPU time of this machine so far, in ticks: what the hypervisor took."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return fields[7], sum(fields)


def paired(rounds: int, n: int) -> tuple[dict[str, dict[str, float]], float]:
    """Issue 28's ratios measured in this one process, pair by pair (``--paired``).

    Across processes the C++ loops' ratios moved more than the effects they measure (raw frees:
    0.82-1.08 in three runs; two-thread scaling: 1.22-1.94x), because each child has its own heap
    layout and its own luck with the VM's cores. Here each ratio's two sides run back to back in
    one process with poolscope installed, in alternating order, ``rounds`` times; the figure is the
    median of the per-round ratios, with its quartiles. "never installed" is the allocator
    poolscope replaced, called directly: the code a process without poolscope runs; "a bare
    forwarding allocator" forwards everything to it, the least any allocator installed in
    PyTorch's place costs (raw frees come through its own deleter).

    Two threads: two serving threads (``_ServingThread``), each in scopes of its own on the one
    pool, run the same loop one at a time, then at once (or the other way round): throughput at
    once over one at a time. Beside it, what they used: CPU time at once over one at a time (above
    1: they cost each other cycles, a shared cache line, a lock that spins, or a core the
    hypervisor shares), waits (a thread blocked: a lock that sleeps) and preemptions; and, returned
    beside the ratios, the share of the machine's time the hypervisor stole meanwhile (/proc/stat).
    ``spin`` is arithmetic with nothing shared: what two threads gain there is what the machine
    gives them at that moment."""
    import statistics
    import time

    import poolscope
    from poolscope.engines import engine_for

    hooks = engine_for(torch.device("cpu")).module._test
    pool = poolscope.TensorPool("cpu", release_idle_s=None)
    with poolscope.pool_scope(pool=pool):  # installs
        pass
    backend = pool._backend

    def timed(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    two = 2 * MiB
    sides: dict[str, tuple[Callable[[], Any], Callable[[], Any], Callable[[float, float], float]]] = {
        # name: (a, b, ratio of the two times); ratios read as "how many times better a is"
        "pooled hit vs never installed (time ratio, 1 thread)": (
            lambda: hooks.churn(backend, 1, n, two), lambda: hooks.churn(None, 1, n, two, via="replaced"),
            lambda a, b: a / b),
        "raw frees outside scopes, rate installed / never installed": (
            lambda: hooks.churn(None, 1, n, two, raw=True), lambda: hooks.churn(None, 1, n, two, raw=True, via="replaced"),
            lambda a, b: b / a),
        "raw frees outside scopes, a bare forwarding allocator / never installed (the floor)": (
            lambda: hooks.churn(None, 1, n, two, raw=True, via="forwarder"),
            lambda: hooks.churn(None, 1, n, two, raw=True, via="replaced"),
            lambda a, b: b / a),
    }
    # Calls four times longer than above: waking two threads costs tens of microseconds here.
    threaded: dict[str, Callable[[], Any]] = {
        "pooled hit, each in its own scope": lambda: hooks.churn(backend, 1, 4 * n, two),
        "never installed (c10 over glibc)": lambda: hooks.churn(None, 1, 4 * n, two, via="replaced"),
        "spin (the machine)": lambda: hooks.spin(1, 32 * n),
    }
    workers = (_ServingThread(), _ServingThread())

    def one_at_a_time(fn: Callable[[], Any]) -> tuple[float, list[ThreadRun]]:
        start = time.perf_counter()
        for w in workers:
            w.fn = fn
            w.go.release()
            w.done.acquire()
        return time.perf_counter() - start, [w.run for w in workers]

    def at_once(fn: Callable[[], Any]) -> tuple[float, list[ThreadRun]]:
        start = time.perf_counter()
        for w in workers:
            w.fn = fn
            w.go.release()
        for w in workers:
            w.done.acquire()
        return time.perf_counter() - start, [w.run for w in workers]

    for a, b, _ in sides.values():  # warm: segments made, held blocks filled, heaps grown
        a(), b()
    for fn in threaded.values():
        one_at_a_time(fn), at_once(fn)
    ratios: dict[str, list[float]] = {name: [] for name in sides}
    for name in threaded:
        ratios.update({f"two threads / one, {name}": [], f"two threads / one, {name}, each thread's own rate": [],
                       f"CPU time, two at once / one at a time, {name}": []})
    waits = {name: 0 for name in threaded}
    preempted = {name: 0 for name in threaded}
    steal0, all0 = _steal()
    for r in range(rounds):
        for name, (a, b, ratio) in sides.items():
            if r % 2 == 0:
                ta, tb = timed(a), timed(b)
            else:
                tb, ta = timed(b), timed(a)
            ratios[name].append(ratio(ta, tb))
        for name, fn in threaded.items():
            if r % 2 == 0:
                (t1, runs1), (t2, runs2) = one_at_a_time(fn), at_once(fn)
            else:
                (t2, runs2), (t1, runs1) = at_once(fn), one_at_a_time(fn)
            ratios[f"two threads / one, {name}"].append(t1 / t2)
            # A server's threads do not wait for each other at the end of a call: what each
            # served per second while both ran, over what one thread serves alone.
            alone = 2 / sum(run.wall_s for run in runs1)
            ratios[f"two threads / one, {name}, each thread's own rate"].append(
                sum(1 / run.wall_s for run in runs2) / alone)
            ratios[f"CPU time, two at once / one at a time, {name}"].append(
                sum(run.cpu_s for run in runs2) / sum(run.cpu_s for run in runs1))
            waits[name] += sum(run.waits for run in runs2)
            preempted[name] += sum(run.preemptions for run in runs2)
    steal1, all1 = _steal()
    summary: dict[str, dict[str, float]] = {}
    for name, values in ratios.items():
        q = statistics.quantiles(values, n=4)
        summary[name] = {"median": statistics.median(values), "q1": q[0], "q3": q[2], "rounds": len(values)}
    for name in threaded:
        summary[f"two threads / one, {name}"].update({"waits at once": waits[name], "preemptions at once": preempted[name]})
    return summary, (steal1 - steal0) / max(1, all1 - all0)


# --- the run --------------------------------------------------------------------------------------

# workload key -> (function, parameters, smoke parameters, extra modes beside plain and pooled)
WORKLOADS: dict[str, tuple[str, dict[str, Any], dict[str, Any], tuple[str, ...]]] = {
    "tiny ops (10k on 16x16)": ("tiny_ops", {}, {"n": 200}, ()),
    "decode loop, KV cache (48 tokens)": ("decode", {}, {"tokens": 4, "prompt": 256}, ()),
    "attention L=2048, inference_mode": ("attention", {"context": "inference_mode"}, {"length": 256}, ("out",)),
    "attention L=2048, no_grad": ("attention", {"context": "no_grad"}, {"length": 256}, ("out",)),
    "hand-written-pool style 64 MiB scratch forward": ("handwritten_scratch", {}, {"tokens": 4096}, ("reuse",)),
    "TransformerEncoder L=4096 d=256": ("encoder", {}, {"length": 256}, ()),
    "torch.empty(1 MiB) + free (10k)": ("hit_path", {}, {"n": 100}, ()),
    "1 thread (200 x 4 MiB)": ("threads", {"workers": 1, "threads": 1}, {"iters": 5, "workers": 1, "threads": 1}, ()),
    "4 threads (200 x 4 MiB each)": ("threads", {"workers": 4, "threads": 1}, {"iters": 5, "workers": 4, "threads": 1}, ()),
    "C++ 2 MiB hit, 1 thread": ("cxx_churn", {}, {"n": 100}, ()),
    "C++ 8 MiB hit, 1 thread": ("cxx_churn", {"size": 8 * MiB}, {"n": 100, "size": 8 * MiB}, ()),
    "C++ 2 MiB hit, 2 threads": ("cxx_churn", {"workers": 2}, {"n": 100, "workers": 2}, ()),
    "C++ 2 MiB hit, depth 256": ("cxx_churn", {"depth": 256}, {"n": 100, "depth": 256}, ()),
    "C++ raw 2 MiB outside scopes": ("cxx_churn", {"raw": True, "inside": False}, {"n": 100, "raw": True, "inside": False}, ()),
}
CXX = {name for name in WORKLOADS if name.startswith("C++")}
NO_GLIBC = {"torch.empty(1 MiB) + free (10k)", "1 thread (200 x 4 MiB)", "4 threads (200 x 4 MiB each)"}
NO_GLIBC |= {"C++ 2 MiB hit, depth 256", "C++ raw 2 MiB outside scopes"}


def fmt(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:.0f}"


def targets(results: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    """The issue's target table, each figure taken from this run."""
    rows = []

    def ms(workload: str, label: str) -> float:
        return results[workload][label]["ms"]

    def row(workload: str, what: str, pooled: float, reference: float, target: str, ok: bool) -> None:
        rows.append([workload, what, fmt(pooled), fmt(reference), f"{pooled / reference:.2f}x", target, "yes" if ok else "NO"])

    for w in ("tiny ops (10k on 16x16)", "decode loop, KV cache (48 tokens)"):
        r = ms(w, "poolscope") / ms(w, "plain")
        row(w, "vs plain", ms(w, "poolscope"), ms(w, "plain"), "<= 1.05x plain", r <= 1.05)
    for w in ("attention L=2048, inference_mode", "attention L=2048, no_grad"):
        r = ms(w, "poolscope") / ms(w, "out")
        row(w, "vs preallocated out=", ms(w, "poolscope"), ms(w, "out"), "<= 1.05x out=", r <= 1.05)
    w = "hand-written-pool style 64 MiB scratch forward"
    row(w, "vs reuse by hand", ms(w, "poolscope"), ms(w, "reuse"), "<= 1.05x reuse", ms(w, "poolscope") / ms(w, "reuse") <= 1.05)
    w = "TransformerEncoder L=4096 d=256"
    row(w, "vs plain", ms(w, "poolscope"), ms(w, "plain"), ">= 1.6x faster", ms(w, "plain") / ms(w, "poolscope") >= 1.6)
    for w in results:
        if "glibc" in results[w]:
            r = ms(w, "poolscope") / ms(w, "glibc")
            row(w, "vs glibc never-give-back", ms(w, "poolscope"), ms(w, "glibc"), "<= 1.05x glibc", r <= 1.05)
    w = "torch.empty(1 MiB) + free (10k)"
    row(w, "vs plain", ms(w, "poolscope"), ms(w, "plain"), "<= 2x plain", ms(w, "poolscope") / ms(w, "plain") <= 2)
    one, four = "1 thread (200 x 4 MiB)", "4 threads (200 x 4 MiB each)"
    scale_plain = 4 * ms(one, "plain") / ms(four, "plain")
    scale_pooled = 4 * ms(one, "poolscope") / ms(four, "poolscope")
    rows.append(
        ["4 threads, each in its own scope", "throughput with 4 threads / with 1", f"{scale_pooled:.2f}x",
         f"{scale_plain:.2f}x (plain)", f"{scale_pooled / scale_plain:.2f} of plain's", ">= 0.8 of plain's",
         "yes" if scale_pooled >= 0.8 * scale_plain else "NO"]
    )
    # Issue 28's targets, from the C++ loops (the same n per thread: time is per thread's work).
    for w in ("C++ 2 MiB hit, 1 thread", "C++ 8 MiB hit, 1 thread"):
        if w in results:
            row(w, "pooled hit vs c10's allocator (glibc)", ms(w, "poolscope"), ms(w, "plain"), "<= 1.0x",
                ms(w, "poolscope") <= ms(w, "plain"))
    one, two = "C++ 2 MiB hit, 1 thread", "C++ 2 MiB hit, 2 threads"
    if one in results and two in results:
        scale = 2 * ms(one, "poolscope") / ms(two, "poolscope")
        rows.append([two, "throughput with 2 threads / with 1", f"{scale:.2f}x", "-", "-", ">= 1.8x",
                     "yes" if scale >= 1.8 else "NO"])
        if "tcmalloc" in results[two]:
            row(two, "vs tcmalloc, 2 threads", ms(two, "poolscope"), ms(two, "tcmalloc"), "<= 1.0x",
                ms(two, "poolscope") <= ms(two, "tcmalloc"))
    w = "C++ raw 2 MiB outside scopes"
    if w in results:
        rate = ms(w, "plain") / ms(w, "poolscope")
        rows.append([w, "rate installed / never installed", fmt(ms(w, "poolscope")), fmt(ms(w, "plain")), f"{rate:.2f}",
                     ">= 0.98", "yes" if rate >= 0.98 else "NO"])
    deep = "C++ 2 MiB hit, depth 256"
    if deep in results and one in results:
        row(deep, "vs depth 1", ms(deep, "poolscope"), ms(one, "poolscope"), "<= 1.5x",
            ms(deep, "poolscope") <= 1.5 * ms(one, "poolscope"))
    return rows


def main() -> int:
    from _harness import Case, arguments, machine, markdown, peers, side_by_side, write_json

    parser = arguments(__doc__, rounds=5, repeats=7)
    parser.add_argument("--paired", action="store_true",
                        help="only the C++ loops' ratios, both sides in this process, round by round (paired())")
    args = parser.parse_args()
    if args.paired:
        rounds, n = (3, 1000) if args.smoke else (max(args.rounds, 9), 200_000)
        summary, stolen = paired(rounds, n)
        print(f"\nmachine: {machine()}; {rounds} rounds, n = {n:,} per call (two threads: {4 * n:,} per thread per call); "
              "median [quartiles] of per-round ratios\n")
        print(markdown(["ratio", "median", "quartiles"],
                       [[k, f"{v['median']:.2f}", f"{v['q1']:.2f}-{v['q3']:.2f}"] for k, v in summary.items()]))
        for k, v in summary.items():
            if "waits at once" in v:
                print(f"{k}: in {rounds} rounds at once, {v['waits at once']} waits, {v['preemptions at once']} preemptions")
        name = "allocation-paired-smoke.json" if args.smoke else "allocation-paired.json"
        print(f"machine time stolen by the hypervisor meanwhile: {stolen:.1%}")
        path = write_json(args.out, name, {"machine": machine(), "rounds": rounds, "n": n, "ratios": summary,
                                           "stolen_share": stolen})
        print(f"\nresults: {path}")
        return 0
    rounds, repeats, warmup = (1, 2, 1) if args.smoke else (args.rounds, args.repeats, 2)
    envs, _ = peers(("plain", "glibc", "tcmalloc"))
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (fn, params, smoke, extra) in WORKLOADS.items():
        if args.only and args.only not in name:
            continue
        cases = [Case("plain", "plain"), Case("poolscope", "pooled")] + [Case(m, m) for m in extra]
        if name not in NO_GLIBC:
            cases.append(Case("glibc", "plain", envs["glibc"]))
        if name in CXX and "tcmalloc" in envs and "depth" not in name and "raw" not in name:
            cases.append(Case("tcmalloc", "plain", envs["tcmalloc"]))
        p = {**params, **(smoke if args.smoke else {}), "repeats": repeats, "warmup": warmup}
        results[name] = side_by_side(Path(__file__), fn, cases, p, rounds)
    print(f"\nmachine: {machine()}; {rounds} rounds x {repeats} steps, medians\n")
    header = ["workload", "plain ms", "poolscope ms", "out= / reuse ms", "glibc never-give-back ms", "faults plain / poolscope"]
    rows = []
    for name, r in results.items():
        alt = r.get("out") or r.get("reuse")
        rows.append([
            name, fmt(r["plain"]["ms"]), fmt(r["poolscope"]["ms"]), fmt(alt["ms"]) if alt else "-",
            fmt(r["glibc"]["ms"]) if "glibc" in r else "-", f"{r['plain']['faults']:.0f} / {r['poolscope']['faults']:.0f}",
        ])
    print(markdown(header, rows))
    table = targets(results) if not args.only else []
    if table:
        print()
        print(markdown(["workload", "comparison", "poolscope ms", "reference ms", "ratio", "target", "met"], table))
    name = "allocation-smoke.json" if args.smoke else "allocation.json"
    if args.only:
        name = name.replace(".json", "-" + "".join(c if c.isalnum() else "-" for c in args.only) + ".json")
    path = write_json(args.out, name,
                      {"machine": machine(), "rounds": rounds, "repeats": repeats, "results": results, "targets": table})
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
