"""capture="all" against plain PyTorch, capture="factories", and plain under tcmalloc.

Workloads: attention inference (B=1, H=8, D=64; scores = q @ k^T, softmax, @ v) at several
sequence lengths, a LongNet-style encoder forward (examples/longnet.py), and an MLP block.
Each runs plain, in pool_scope(capture="factories") and in pool_scope(capture="all"),
interleaved in one process; medians and minor page faults per call. When Debian's
libtcmalloc_minimal.so.4 is installed, the same script re-runs itself under LD_PRELOAD for
the plain column ("tcmalloc") in the same invocation.

Run:  python benchmarks/capture_all.py [--quick] [--json results.json]
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
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import poolscope

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from longnet import LongNetEncoder, set_memory_pool  # noqa: E402

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
MODES = ("plain", "factories", "all")


def attention(length: int) -> Callable[[], torch.Tensor]:
    q, k, v = (torch.randn(1, 8, length, 64) for _ in range(3))

    def run() -> torch.Tensor:
        scores = (q @ k.transpose(-1, -2)) * 0.125
        return scores.softmax(-1) @ v

    return run


def longnet(length: int) -> Callable[[], torch.Tensor]:
    model = LongNetEncoder(192, 6, 2).eval()
    set_memory_pool(model, False)  # the scope around the call decides
    x = torch.randn(1, length, 192)
    return lambda: model(x)


def mlp(tokens: int) -> Callable[[], torch.Tensor]:
    block = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).eval()
    x = torch.randn(tokens, 1024)
    return lambda: block(x)


def workloads(quick: bool) -> dict[str, Callable[[], Callable[[], torch.Tensor]]]:
    lengths = (1024, 2048) if quick else (1024, 2048, 4096, 8192)
    found: dict[str, Callable[[], Callable[[], torch.Tensor]]] = {
        f"attention L={n}": (lambda n=n: attention(n)) for n in lengths
    }
    found["LongNet encoder L=8192"] = lambda: longnet(8192)
    found["MLP block 4096x1024"] = lambda: mlp(4096)
    return found


def measure(make: Callable[[], Callable[[], torch.Tensor]], modes: tuple[str, ...], repeats: int) -> dict:
    torch.manual_seed(0)
    fn = make()
    times: dict[str, list[float]] = {m: [] for m in modes}
    faults: dict[str, list[int]] = {m: [] for m in modes}
    outputs = {}

    def call(mode: str) -> torch.Tensor:
        if mode == "plain":
            return fn()
        with poolscope.pool_scope(capture=mode):
            return fn()

    with torch.no_grad():
        for mode in modes:
            outputs[mode] = call(mode)  # warm-up: pool filled, layouts cached
        for _ in range(repeats):
            for mode in modes:
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                call(mode)
                times[mode].append((time.perf_counter() - start) * 1e3)
                faults[mode].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    identical = all(torch.equal(outputs[modes[0]], outputs[m]) for m in modes)
    return {
        m: {"ms": statistics.median(times[m]), "min": min(times[m]), "max": max(times[m]),
            "faults": int(statistics.median(faults[m]))}
        for m in modes
    } | {"identical": identical}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI smoke)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plain-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    modes = ("plain",) if args.plain_only else MODES
    results = {name: measure(make, modes, repeats) for name, make in workloads(args.quick).items()}
    if args.plain_only:
        print(json.dumps(results))
        return
    if os.path.exists(TCMALLOC):
        command = [sys.executable, __file__, "--plain-only"] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, env={**os.environ, "LD_PRELOAD": TCMALLOC}, capture_output=True, text=True, check=True)
        for name, row in json.loads(done.stdout.strip().splitlines()[-1]).items():
            results[name]["tcmalloc"] = row["plain"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; medians of {repeats}, minor page faults per call")
    print()
    print("| workload | plain | factories | all | tcmalloc | all vs plain | all vs tcmalloc | faults plain / all / tcmalloc | bit-identical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        plain, factories, every = r["plain"]["ms"], r["factories"]["ms"], r["all"]["ms"]
        tc = r.get("tcmalloc")
        tc_ms = f"{tc['ms']:.1f} ms" if tc else "n/a"
        vs_tc = f"{every / tc['ms']:.2f}x" if tc else "n/a"
        tc_faults = tc["faults"] if tc else "n/a"
        print(
            f"| {name} | {plain:.1f} ms | {factories:.1f} ms | {every:.1f} ms | {tc_ms} | "
            f"{plain / every:.2f}x faster | {vs_tc} | {r['plain']['faults']} / {r['all']['faults']} / {tc_faults} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
