"""Core figures: the pool's hit path, a seed-style scratch forward, and per-op overhead.

Each comparison runs side by side in one process, interleaved, and reports
medians; shared machines are noisy, so read the ratios, not the absolute times.

Run:  python benchmarks/core.py [--quick]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

import poolscope

MiB = 1 << 20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def per_call_us(fn, calls: int, rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def hit_path(rounds: int) -> None:
    pool = poolscope.TensorPool("cpu")
    size, stride = (MiB // 4,), (1,)

    def lend_and_release() -> None:
        pool.lend(size, stride, torch.float32, MiB)

    lend_and_release()  # warm: the block is cached from here on
    lend = per_call_us(lend_and_release, 2000, rounds)
    x = torch.empty(1)
    plain_empty = per_call_us(lambda: torch.empty(MiB // 4), 2000, rounds)
    with poolscope.pool_scope():
        scoped_empty = per_call_us(lambda: torch.empty(MiB // 4), 2000, rounds)
    print("| hit path | per call |")
    print("| --- | --- |")
    print(f"| TensorPool.lend of a cached 1 MiB block + release | {lend:.1f} µs |")
    print(f"| torch.empty(1 MiB) plain (malloc, pages untouched) | {plain_empty:.1f} µs |")
    print(f"| torch.empty(1 MiB) in pool_scope (cache hit) | {scoped_empty:.1f} µs |")
    del x


def scratch_forward(sizes_mib: list[int], repeats: int) -> None:
    print()
    print("| zero-initialised scratch per forward | plain | pooled | hand-written reuse | plain/pooled | pooled/reuse | faults plain / pooled |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mib in sizes_mib:
        n = mib * MiB // 4
        static = torch.zeros(n)

        def plain() -> None:
            buf = torch.zeros(n)
            buf.add_(1.0)

        @poolscope.pooled_forward
        def pooled() -> None:
            buf = torch.zeros(n)
            buf.add_(1.0)

        def reuse() -> None:
            static.zero_()
            static.add_(1.0)

        results: dict[str, list[float]] = {"plain": [], "pooled": [], "reuse": []}
        faults: dict[str, list[int]] = {"plain": [], "pooled": [], "reuse": []}
        pooled()
        for _ in range(repeats):
            for name, fn in (("plain", plain), ("pooled", pooled), ("reuse", reuse)):
                f0, t0 = minor_faults(), time.perf_counter()
                fn()
                results[name].append((time.perf_counter() - t0) * 1e3)
                faults[name].append(minor_faults() - f0)
        med = {k: statistics.median(v) for k, v in results.items()}
        fmed = {k: int(statistics.median(v)) for k, v in faults.items()}
        print(
            f"| {mib} MiB | {med['plain']:.2f} ms | {med['pooled']:.2f} ms | {med['reuse']:.2f} ms | "
            f"{med['plain'] / med['pooled']:.2f}x | {med['pooled'] / med['reuse']:.2f}x | "
            f"{fmed['plain']} / {fmed['pooled']} |"
        )


def tiny_ops(rounds: int) -> None:
    x = torch.ones(4)

    def loop() -> None:
        for _ in range(1000):
            x.add(1)

    plain, scoped, device = [], [], []
    for _ in range(rounds):
        plain.append(per_call_us(loop, 1, 1) / 1000)
        with poolscope.pool_scope():
            scoped.append(per_call_us(loop, 1, 1) / 1000)
        with torch.device("cpu"):
            device.append(per_call_us(loop, 1, 1) / 1000)
    p, s, d = (statistics.median(v) for v in (plain, scoped, device))
    print()
    print("| tiny op (x.add(1) on 4 floats) | per op | vs plain |")
    print("| --- | --- | --- |")
    print(f"| plain | {p:.2f} µs | 1.00x |")
    print(f"| in pool_scope | {s:.2f} µs | {s / p:.2f}x |")
    print(f"| in torch.device('cpu') | {d:.2f} µs | {d / p:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (CI smoke)")
    args = parser.parse_args()
    rounds = 3 if args.quick else 15
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print()
    hit_path(rounds)
    scratch_forward([4, 16] if args.quick else [4, 16, 32, 64, 128], 3 if args.quick else 15)
    tiny_ops(rounds)


if __name__ == "__main__":
    main()
