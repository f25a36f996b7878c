"""The benchmark suite: where pooling must win, and where it must cost next to nothing.

Every comparison runs side by side in one process, interleaved (plain, pooled, ... in turn),
and reports medians with min-max; page faults are minor faults from getrusage; peak RSS comes
from a child process per variant. Results go to a JSON file and a PNG plot (speedup against
sequence length; needs matplotlib).

Run:  python benchmarks/suite.py [--quick] [--out results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import poolscope

MiB = 1 << 20
WIDTH = 256  # floats per token: sequence 4k -> 4 MiB buffers, 128k -> 128 MiB


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Run each variant once per round, in turn; medians, min, max (ms) and faults per call."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    flts: dict[str, list[int]] = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            f0, t0 = faults(), time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            flts[name].append(faults() - f0)
    return {
        k: {"ms": statistics.median(v), "min": min(v), "max": max(v), "faults": statistics.median(flts[k])}
        for k, v in times.items()
    }


class SeedScratch(nn.Module):
    """A seed-style module: zero-initialised output and scratch buffers on every forward."""

    def __init__(self, enable_memory_pool: bool) -> None:
        super().__init__()
        self.enable_memory_pool = enable_memory_pool

    @poolscope.pooled_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], WIDTH)
        scratch = torch.zeros(x.shape[0], WIDTH)
        scratch.add_(x[:, None])
        return out.add_(scratch)


class StaticReuse:
    """The limit: buffers allocated once by hand and zeroed on every forward."""

    def __init__(self, length: int) -> None:
        self.out = torch.zeros(length, WIDTH)
        self.scratch = torch.zeros(length, WIDTH)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.out.zero_()
        self.scratch.zero_()
        self.scratch.add_(x[:, None])
        return self.out.add_(self.scratch)


def scratch_sweep(lengths: list[int], repeats: int) -> dict[int, dict]:
    rows = {}
    for length in lengths:
        x = torch.randn(length)
        plain, pooled, reuse = SeedScratch(False), SeedScratch(True), StaticReuse(length)
        rows[length] = interleaved({"plain": lambda: plain(x), "pooled": lambda: pooled(x), "reuse": lambda: reuse(x)}, repeats)
    return rows


def encoder_overhead(repeats: int) -> dict:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(128, 4, 512, batch_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
    x = torch.randn(8, 128, 128)

    def pooled() -> torch.Tensor:
        with poolscope.pool_scope():
            return model(x)

    with torch.no_grad():
        return interleaved({"plain": lambda: model(x), "pooled": pooled}, repeats)


def tiny_ops(repeats: int) -> dict:
    x = torch.ones(4)

    def loop() -> None:
        for _ in range(10_000):
            x.add(1)

    def scoped() -> None:
        with poolscope.pool_scope():
            loop()

    def device() -> None:
        with torch.device("cpu"):
            loop()

    return interleaved({"plain": loop, "pool_scope": scoped, "torch.device": device}, repeats)


def hit_path(repeats: int) -> dict:
    pool = poolscope.TensorPool("cpu")
    size, stride = (MiB // 4,), (1,)
    pool.lend(size, stride, torch.float32, MiB)  # cache one block

    def lend_many() -> None:
        for _ in range(2000):
            pool.lend(size, stride, torch.float32, MiB)

    r = interleaved({"lend": lend_many}, repeats)["lend"]
    return {"us_per_call": r["ms"] * 1e3 / 2000, "min_us": r["min"] * 1e3 / 2000, "max_us": r["max"] * 1e3 / 2000}


INFERENCE_CHILD = """
import sys, torch, poolscope
steps, pooled = int(sys.argv[1]), sys.argv[2] == "pooled"
w = torch.randn(256, 256)
def step(i):
    context = torch.zeros(1024, 256)           # 1 MiB, zero-initialised each step
    noise = torch.randn(1024, 256)
    return (context.add_(noise) @ w).sum()
scope = poolscope.pool_scope(name="loop") if pooled else None
if scope: scope.__enter__()
for i in range(steps):
    step(i)
if scope: scope.__exit__(None, None, None)
# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's, which would hide the loop's own peak.
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def inference_rss(steps: int) -> dict:
    out = {}
    for variant in ("plain", "pooled"):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", INFERENCE_CHILD, str(steps), variant], capture_output=True, text=True, check=True)
        out[variant] = {"peak_rss_mib": int(done.stdout.split()[-1]) / 1024, "seconds": time.perf_counter() - t0}
    return out


def threads(iterations: int, repeats: int) -> dict:
    def work(pooled: bool) -> None:
        ctx = poolscope.pool_scope() if pooled else torch.no_grad()
        with ctx:
            for _ in range(iterations):
                torch.zeros(MiB // 4).add_(1)

    def run(n: int, pooled: bool) -> Callable[[], None]:
        def go() -> None:
            ts = [threading.Thread(target=work, args=(pooled,)) for _ in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        return go

    r = interleaved({f"{'pooled' if p else 'plain'} x{n}": run(n, p) for n in (1, 4) for p in (False, True)}, repeats)
    return {k: {"allocs_per_s": (iterations * int(k[-1])) / (v["ms"] / 1e3), **v} for k, v in r.items()}


def plot(sweep: dict[int, dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    lengths = sorted(sweep)
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant, label in (("pooled", "pooled (poolscope)"), ("reuse", "hand-written reuse")):
        ax.plot(lengths, [sweep[n]["plain"]["ms"] / sweep[n][variant]["ms"] for n in lengths], marker="o", label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.axvline(32 * MiB / (WIDTH * 4), color="grey", linestyle=":", linewidth=0.8)
    ax.text(32 * MiB / (WIDTH * 4), ax.get_ylim()[1] * 0.95, "glibc mmap ceiling (32 MiB) ", fontsize=8, va="top", ha="right")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"sequence length (buffer = length x {WIDTH} floats)")
    ax.set_ylabel("speedup over plain PyTorch")
    ax.set_title("Seed-style forward: two zero-initialised buffers per call")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI smoke)")
    parser.add_argument("--out", default="results", help="folder for benchmarks.json and speedup.png")
    args = parser.parse_args()
    quick = args.quick
    repeats = 3 if quick else 11
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lengths = [4096, 32768] if quick else [4096 * 2**i for i in range(6)]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    results = {
        "machine": machine,
        "scratch": scratch_sweep(lengths, repeats),
        "encoder": encoder_overhead(repeats),
        "tiny_ops": tiny_ops(repeats),
        "hit_path": hit_path(repeats),
        "inference_rss": inference_rss(500 if quick else 10_000),
        "threads": threads(50 if quick else 400, repeats),
    }
    (out / "benchmarks.json").write_text(json.dumps(results, indent=2, default=str))
    plotted = plot(results["scratch"], out / "speedup.png")

    print(f"machine: {machine}; medians of {repeats}, interleaved")
    print("\n| seed-style forward | plain | pooled | reuse | pooled vs plain | pooled vs reuse | faults plain / pooled |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n, r in results["scratch"].items():
        p, q, u = r["plain"], r["pooled"], r["reuse"]
        print(
            f"| {n // 1024}k tokens, {n * WIDTH * 4 // MiB} MiB buffers | {p['ms']:.2f} ms ({p['min']:.2f}-{p['max']:.2f}) | "
            f"{q['ms']:.2f} ms ({q['min']:.2f}-{q['max']:.2f}) | {u['ms']:.2f} ms | {p['ms'] / q['ms']:.2f}x faster | "
            f"{q['ms'] / u['ms']:.2f}x | {p['faults']:.0f} / {q['faults']:.0f} |"
        )
    e = results["encoder"]
    t = results["tiny_ops"]
    h = results["hit_path"]
    rss = results["inference_rss"]
    print("\n| check | result | target |")
    print("| --- | --- | --- |")
    print(f"| small encoder (d=128, L=128, batch 8, 4 layers, eval): scope vs plain | {e['pooled']['ms']:.2f} vs {e['plain']['ms']:.2f} ms = {e['pooled']['ms'] / e['plain']['ms'] - 1:+.1%} | <= +10% |")
    print(f"| 10k tiny ops: pool_scope / plain | {t['pool_scope']['ms'] / t['plain']['ms']:.2f}x (torch.device: {t['torch.device']['ms'] / t['plain']['ms']:.2f}x) | <= 3.5x |")
    print(f"| pool hit path (lend + release of a cached 1 MiB block) | {h['us_per_call']:.1f} µs ({h['min_us']:.1f}-{h['max_us']:.1f}) | <= 10 µs |")
    print(f"| inference loop peak RSS, pooled / plain | {rss['pooled']['peak_rss_mib']:.0f} / {rss['plain']['peak_rss_mib']:.0f} MiB = {rss['pooled']['peak_rss_mib'] / rss['plain']['peak_rss_mib']:.2f}x | <= 1.25x |")
    th = results["threads"]
    for kind in ("plain", "pooled"):
        one, four = th[f"{kind} x1"]["allocs_per_s"], th[f"{kind} x4"]["allocs_per_s"]
        print(f"| threads, {kind}: allocations/s with 1 and 4 threads | {one:,.0f} -> {four:,.0f} ({four / one:.2f}x) | scales, no convoy |")
    print(f"\nresults: {out / 'benchmarks.json'}" + (f", plot: {out / 'speedup.png'}" if plotted else " (no plot: pip install matplotlib)"))


if __name__ == "__main__":
    main()
