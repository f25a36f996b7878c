"""Resident memory after memory is given back, with whatever allocator torch uses here.

Two ways, each in a fresh child process: plain torch allocates and frees 64 tensors of 1.5 MiB
and one of 256 MiB; poolscope lends the same from its pool, then releases its cache
(`release_unused()`, which returns each segment to the allocator it replaced after dropping
its pages). RSS is read at once and after 1, 5 and 30 s idle. Where that allocator keeps freed
memory resident (glibc's heap for mid-sized blocks, mimalloc's purge delay: torch >= 2.10 on
aarch64 serves CPU tensors from mimalloc), plain shows it and poolscope must not.

    python benchmarks/release_rss.py [--out benchmarks/results] [--smoke]   # prints a table
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import sys, time, torch, poolscope

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

pooled = sys.argv[1] == "poolscope"
torch.zeros(1)
base = rss()
scope = poolscope.pool_scope() if pooled else None
if scope is not None:
    scope.__enter__()
small = [torch.ones(3 << 17) for _ in range(64)]  # 64 x 1.5 MiB
big = torch.ones(64 << 20)                           # 256 MiB
if scope is not None:
    scope.__exit__(None, None, None)
held = rss()
del small, big
if pooled:
    poolscope.release_unused()
freed = rss()
time.sleep(float(sys.argv[2]))
one = rss()
time.sleep(float(sys.argv[3]))
five = rss()
time.sleep(float(sys.argv[4]))
print(f"{base:.0f} {held:.0f} {freed:.0f} {one:.0f} {five:.0f} {rss():.0f}")
"""


def main() -> int:
    from _harness import machine, write_json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--smoke", action="store_true", help="waits of 0.1 s: checks that it runs")
    args = parser.parse_args()
    waits = ("0.05", "0.05", "0.05") if args.smoke else ("1", "4", "25")
    rows = {}
    for way in ("plain", "poolscope"):
        out = subprocess.run([sys.executable, "-c", CHILD, way, *waits], capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows[way] = [float(v) for v in out.stdout.split()]
    print(f"machine: {machine()} ({platform.machine()}); RSS in MiB")
    print("| workload | setup | RSS before | holding 352 MiB | just after free/release | after 1 s | after 5 s | after 30 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for way, values in rows.items():
        print(f"| 64 x 1.5 MiB + 256 MiB, freed | {way} | " + " | ".join(f"{v:.0f}" for v in values) + " |")
    name = "release-rss-smoke" if args.smoke else f"release-rss-{platform.machine()}"
    write_json(args.out, f"{name}.json", {"machine": machine(), "arch": platform.machine(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
