"""Speed without keeping the memory: poolscope against allocators that never give memory back.

Three workloads, each plain, plain under glibc's never-give-back tuning, plain under jemalloc,
mimalloc and tcmalloc preloads (where installed), and inside poolscope scopes:

1. a one-off 1 GiB scope, then a steady loop of scopes that each hold 3 x 32 MiB at once;
2. attention over random sequence lengths (L uniform in 512..4096, B1 H8 D64), one scope a step;
3. the steady attention loop alone (L=2048).

For each: time per step (median), peak RSS (VmHWM) and RSS at the end, once the workload's
tensors are gone; for poolscope also after ``poolscope.release_unused()``. Cases run in child
processes, side by side, round after round (``_harness.py``).

Run:  python benchmarks/memory.py [--rounds 2] [--out benchmarks/results] [--smoke]
      python benchmarks/memory.py --from-json benchmarks/results/memory.json  (table and plot again)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import torch

from _harness import MiB, scope_for


def _with_release_report(mode: str, step: Callable[[], Any]) -> Callable[[], Any]:
    """Let the child report RSS after ``release_unused()`` too (poolscope only)."""
    if mode == "pooled":

        def report() -> dict[str, Any]:
            import gc

            import poolscope

            gc.collect()
            poolscope.release_unused()
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            return {"released_rss": rss}

        step.report = report  # type: ignore[attr-defined]
    return step


def spike_then_steady(mode: str, spike_mib: int = 1024, mib: int = 32) -> Callable[[], Any]:
    scope = scope_for(mode)
    with scope():
        spike = torch.ones(spike_mib * MiB // 4)
        del spike

    def step() -> None:
        with scope():  # 3 x 32 MiB alive at once
            a = torch.ones(mib * MiB // 4)
            b = a * 2
            c = a + b
            del a, b, c

    return _with_release_report(mode, step)


def _attention(length: int) -> torch.Tensor:
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))
    return ((q @ k.transpose(-1, -2)) * 0.125).softmax(-1) @ v


def random_attention(mode: str, low: int = 512, high: int = 4096) -> Callable[[], Any]:
    scope = scope_for(mode)
    rng = random.Random(0)

    def step() -> None:
        with torch.inference_mode(), scope():
            _attention(rng.randint(low, high))

    return _with_release_report(mode, step)


def steady_attention(mode: str, length: int = 2048) -> Callable[[], Any]:
    scope = scope_for(mode)

    def step() -> None:
        with torch.inference_mode(), scope():
            _attention(length)

    return _with_release_report(mode, step)


WORKLOADS = {  # name: (function, parameters, smoke parameters, steps)
    "1 GiB once, then 3 x 32 MiB scopes": ("spike_then_steady", {}, {"spike_mib": 64, "mib": 4}, 200),
    "attention, L random in 512..4096": ("random_attention", {}, {"low": 64, "high": 256}, 500),
    "attention, L=2048 steady": ("steady_attention", {}, {"length": 256}, 100),
}


def plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    for row, (name, r) in enumerate(results.items()):
        labels = list(r)
        colors = ["tab:green" if lab == "poolscope" else "tab:gray" for lab in labels]
        axes[row][0].barh(labels, [r[lab]["ms"] for lab in labels], color=colors)
        axes[row][0].set_title(f"{name}: ms per step (median)", fontsize=9)
        axes[row][1].barh(labels, [r[lab]["peak_rss_mib"] for lab in labels], color="tab:blue", alpha=0.35, label="peak")
        axes[row][1].barh(labels, [r[lab]["end_rss_mib"] for lab in labels], color=colors, label="at the end")
        axes[row][1].set_title("RSS MiB: peak (light) and at the end", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    from _harness import markdown

    rows = []
    for name, r in results.items():
        fastest = min(v["ms"] for k, v in r.items() if k != "poolscope")
        # The peers that kept their memory and so matched its speed (jemalloc and mimalloc, as
        # configured by default, give large blocks back and fault like plain PyTorch).
        as_fast = [k for k, v in r.items() if k not in ("plain", "poolscope") and v["ms"] <= 1.5 * fastest]
        for label, v in r.items():
            released = v["extra"].get("released_rss")
            rows.append([
                name, label, f"{v['ms']:.2f}", f"{v['ms'] / fastest:.2f}x", f"{v['peak_rss_mib']:.0f}",
                f"{v['end_rss_mib']:.0f}", f"{released / 2**20:.0f}" if released else "-",
            ])
        pooled, plain = r["poolscope"], r["plain"]
        below = all(pooled["end_rss_mib"] < r[k]["end_rss_mib"] for k in as_fast)
        verdict = (
            f"poolscope {pooled['ms'] / fastest:.2f}x the fastest peer's time (target <= 1.05x); "
            f"end RSS, working set kept, {pooled['end_rss_mib'] / plain['end_rss_mib']:.2f}x plain's (target <= 1.2x), "
            f"after release_unused {pooled['extra']['released_rss'] / 2**20 / plain['end_rss_mib']:.2f}x; "
            f"end RSS below every peer as fast as it ({', '.join(as_fast) or 'none'}): {'yes' if below else 'NO'}"
        )
        rows.append([name, "**verdict**", verdict, "", "", "", ""])
    header = ["workload", "allocator", "ms per step", "vs fastest peer", "peak RSS MiB", "end RSS MiB", "after release_unused MiB"]
    return markdown(header, rows)


def main() -> int:
    from _harness import Case, arguments, machine, peers, side_by_side, write_json

    parser = arguments(__doc__, rounds=2, only=False)
    parser.add_argument("--from-json", type=Path, help="print the table and draw the plot of an earlier run")
    args = parser.parse_args()
    if args.from_json:
        import json

        results = json.loads(args.from_json.read_text())["results"]
        print(table(results))
        picture = args.from_json.with_suffix(".png")
        print(f"plot: {picture}" if plot(results, picture) else "no plot: matplotlib missing")
        return 0
    envs, missing = peers()
    cases = [Case(name, "plain", env) for name, env in envs.items()] + [Case("poolscope", "pooled")]
    rounds = 1 if args.smoke else args.rounds
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for name, (fn, params, smoke, steps) in WORKLOADS.items():
        p = {**params, **(smoke if args.smoke else {}), "repeats": 3 if args.smoke else steps, "warmup": 1}
        results[name] = side_by_side(Path(__file__), fn, cases, p, rounds)
    print(f"\nmachine: {machine()}; {rounds} round(s), medians; missing peers: {'; '.join(missing) or 'none'}\n")
    print(table(results))
    out = write_json(args.out, "memory-smoke.json" if args.smoke else "memory.json",
                     {"machine": machine(), "rounds": rounds, "missing": missing, "results": results})
    picture = args.out / ("memory-smoke.png" if args.smoke else "memory.png")
    print(f"\nresults: {out}" + (f"; plot: {picture}" if plot(results, picture) else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
