"""Burst then idle: the memory benchmark's workload for memory given back by time.

A 1 GiB burst (three steps, each holding 64 tensors of 16 MiB at once; inside ``pool_scope()``
for poolscope, plain for the others), then nothing at all for ``--seconds`` (default 120): RSS above the process's baseline, sampled every second.
Columns: plain PyTorch, poolscope with its defaults (the idle clock at 10 s: a burst with nothing after it teaches it nothing), glibc told never to
give memory back, jemalloc with ``background_thread:true,dirty_decay_ms:10000``, mimalloc and
tcmalloc (preloaded where installed). The columns run at the same time, each in a child process
of its own: they are idle for almost all of the run, so they do not slow each other.

Run:  python benchmarks/idle.py [--seconds 120] [--out benchmarks/results] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BURST_MIB = 1024
MOMENTS = (0, 1, 2, 5, 9, 12, 15, 20, 30, 60, 90, 120)

CHILD = r"""
import contextlib, json, sys, time
import torch

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

mode, burst_mib, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
torch.set_num_threads(1)
scope = contextlib.nullcontext
if mode == "pooled":
    import poolscope
    scope = poolscope.pool_scope
    with scope():
        torch.ones(1)  # build, install: not part of the burst
base = rss_mib()
for step in range(3):  # a few steps of a loop, each holding the burst's tensors at once
    with scope():
        burst = [torch.ones(4 << 20) for _ in range(burst_mib // 16)]  # 16 MiB each
        del burst
started = time.monotonic()
samples = []
for second in range(int(seconds) + 1):
    time.sleep(max(0.0, started + second - time.monotonic()))
    samples.append(rss_mib() - base)
print(json.dumps({"base": base, "samples": samples}))
"""


def columns() -> tuple[dict[str, tuple[str, dict[str, str]]], list[str]]:
    from _harness import peers

    envs, missing = peers()
    cols: dict[str, tuple[str, dict[str, str]]] = {}
    for name, env in envs.items():
        if name == "jemalloc":
            env = {**env, "MALLOC_CONF": "background_thread:true,dirty_decay_ms:10000"}
        cols[name if name != "jemalloc" else "jemalloc (decay 10 s)"] = ("plain", env)
    cols["poolscope"] = ("pooled", {})
    return cols, missing


def run(seconds: float, burst_mib: int) -> dict[str, list[float]]:
    cols, _ = columns()
    children = {}
    for label, (mode, env) in cols.items():
        children[label] = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(burst_mib), str(seconds)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, **env},
        )
    results = {}
    for label, child in children.items():
        out, _ = child.communicate(timeout=seconds + 600)
        if child.returncode != 0:
            raise SystemExit(f"{label}: the child failed (exit {child.returncode})")
        results[label] = json.loads(out)["samples"]
    return results


def table(results: dict[str, list[float]], seconds: float) -> str:
    from _harness import markdown

    moments = [m for m in MOMENTS if m <= seconds]
    header = ["workload", "allocator", *[f"{m} s" for m in moments], "back below 64 MiB at"]
    rows = []
    for label, samples in results.items():
        back = next((t for t, v in enumerate(samples) if v < 64), None)
        rows.append([f"{BURST_MIB} MiB bursts, then idle" if rows == [] else "", label,
                     *[f"{samples[m]:.0f}" for m in moments], "never" if back is None else f"{back} s"])
    return markdown(header, rows)


def plot(results: dict[str, list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, samples in results.items():
        ax.plot(range(len(samples)), samples, label=label, linewidth=2.5 if label == "poolscope" else 1.2)
    ax.set_xlabel("seconds after the burst")
    ax.set_ylabel("RSS above baseline, MiB")
    ax.set_title(f"{BURST_MIB} MiB burst, then idle", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    from _harness import machine, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="idle time sampled (default 120)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--smoke", action="store_true", help="64 MiB, 3 s: checks that it runs")
    args = parser.parse_args()
    global BURST_MIB
    seconds = 3.0 if args.smoke else args.seconds
    if args.smoke:
        BURST_MIB = 64
    results = run(seconds, BURST_MIB)
    _, missing = columns()
    print(f"\nmachine: {machine()}; RSS above each process's baseline, MiB; missing peers: {'; '.join(missing) or 'none'}\n")
    print(table(results, seconds))
    name = "idle-smoke" if args.smoke else "idle"
    out = write_json(args.out, f"{name}.json", {"machine": machine(), "burst_mib": BURST_MIB, "results": results})
    picture = args.out / f"{name}.png"
    print(f"\nresults: {out}" + (f"; plot: {picture}" if plot(results, picture) else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
