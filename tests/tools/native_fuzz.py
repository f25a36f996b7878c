"""Randomized stress of the native engine: random programs of allocations, frees in any order and
any thread, resize_, out=, nested and out-of-order scopes, pools with limits, and forks midway.

After every step: no two live tensors share a byte, the ones touched still hold what was written
into them, and capped pools stay within their caps. After each program: every tensor still
holds its contents, and once all are dropped every pool has nothing in use.

    python tests/tools/native_fuzz.py [--seconds S] [--seed N]   # what scripts/sanitize runs

Used by tests/test_native_fuzz.py with fixed seeds.
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

import poolscope

MiB = 1 << 20
# Checks run on another thread: its allocations (the comparison's temporaries) are outside every
# scope, so they neither count toward a scope's max_bytes nor change what the program pools.
_CHECKER = ThreadPoolExecutor(max_workers=1)


def _new_checker() -> None:  # a forked child has no copy of the checker's thread
    global _CHECKER
    _CHECKER = ThreadPoolExecutor(max_workers=1)


os.register_at_fork(after_in_child=_new_checker)


@dataclass
class Live:
    tensor: torch.Tensor
    value: int
    length: int  # the first `length` bytes hold `value`


@dataclass
class Counts:
    programs: int = 0
    steps: int = 0
    allocations: int = 0
    forks: int = 0
    refusals: int = 0
    by_op: dict = field(default_factory=dict)


def _size(rng: random.Random) -> int:
    kind = rng.random()
    if kind < 0.3:
        return MiB + rng.choice([-1, 0, 1, 511, 512, 513, 4096])  # around the threshold
    if kind < 0.5:
        return rng.randrange(1, 512 << 10)  # below it
    if kind < 0.9:
        return rng.randrange(MiB, 16 * MiB)
    return rng.randrange(16 * MiB, 64 * MiB)  # far above


class Program:
    def __init__(self, seed: int, counts: Counts) -> None:
        self.rng = random.Random(seed)
        self.counts = counts
        self.live: list[Live] = []
        self.scopes: list[tuple[poolscope.PoolScope, bool]] = []  # (scope, refused inside it)
        self.pools = [
            poolscope.TensorPool("cpu"),
            poolscope.TensorPool("cpu", max_bytes=self.rng.choice([8, 24, 64]) * MiB),
            poolscope.TensorPool("cpu", max_cached_bytes=self.rng.choice([0, 4, 32]) * MiB),
        ]
        self.graveyard: queue.Queue = queue.Queue()
        self.reaper = threading.Thread(target=self._reap, daemon=True)
        self.reaper.start()

    def _reap(self) -> None:
        while True:
            item = self.graveyard.get()
            if item is None:
                return
            del item  # the last reference dies in this thread

    # --- steps -----------------------------------------------------------------------------

    def alloc(self) -> None:
        if len(self.live) >= 24 or sum(x.tensor.untyped_storage().nbytes() for x in self.live) > 384 * MiB:
            return self.drop()
        n = _size(self.rng)
        value = self.rng.randrange(256)
        try:
            t = torch.full((n,), value, dtype=torch.uint8)
        except torch.OutOfMemoryError:  # a raising scope's max_bytes
            self.counts.refusals += 1
            self.scopes = [(s, True) for s, _ in self.scopes]
            return
        self.counts.allocations += 1
        self.live.append(Live(t, value, n))

    def drop(self) -> None:
        if self.live:
            self.live.pop(self.rng.randrange(len(self.live)))

    def drop_elsewhere(self) -> None:
        if self.live:
            self.graveyard.put(self.live.pop(self.rng.randrange(len(self.live))).tensor)

    def resize(self) -> None:
        if self.live:
            x = self.rng.choice(self.live)
            n = max(1, int(x.tensor.numel() * self.rng.choice([0.5, 1.5, 3.0])))
            try:
                x.tensor.resize_(n)
            except torch.OutOfMemoryError:
                self.counts.refusals += 1
                self.scopes = [(s, True) for s, _ in self.scopes]
                return
            x.length = min(x.length, n)

    def out(self) -> None:
        if self.live:
            x = self.rng.choice(self.live)
            n = _size(self.rng)
            value = self.rng.randrange(256)
            try:
                torch.full((n,), value, dtype=torch.uint8, out=x.tensor)
            except torch.OutOfMemoryError:
                self.counts.refusals += 1
                self.scopes = [(s, True) for s, _ in self.scopes]
                return
            x.value, x.length = value, n

    def enter(self) -> None:
        if len(self.scopes) >= 4:
            return self.exit()
        pool = self.rng.choice(self.pools)
        limit = self.rng.choice([None, None, 16 * MiB, 96 * MiB])
        scope = poolscope.pool_scope(
            pool=pool,
            threshold=self.rng.choice([0, 512 << 10, MiB]),
            max_bytes=limit,
            on_limit=self.rng.choice(["raise", "fallback"]),
        )
        scope.__enter__()
        self.scopes.append((scope, False))

    def exit(self) -> None:
        if self.scopes:
            scope, refused = self.scopes.pop(self.rng.randrange(len(self.scopes)))  # any order
            try:
                scope.__exit__(None, None, None)
            except poolscope.ScopeLimitError:
                assert refused, "a scope reported a refusal that did not happen"

    def fork(self) -> None:
        # A child of a process whose OpenMP pool has run hangs in plain PyTorch: fork only with one thread.
        if not hasattr(os, "fork") or torch.get_num_threads() != 1:
            return
        self.counts.forks += 1
        pid = os.fork()
        if pid == 0:  # the child: its memory is a copy; the engine must keep working in it
            failed = []

            def pooled_work() -> None:  # a new thread: outside the scopes the parent had open
                try:
                    with poolscope.pool_scope(pool=self.pools[0]):
                        a = torch.full((3 * MiB,), 7, dtype=torch.uint8)
                        b = torch.full((3 * MiB,), 9, dtype=torch.uint8)
                        assert a.data_ptr() != b.data_ptr() and int(a.sum()) == 7 * 3 * MiB
                    assert self.pools[0].stats().blocks_in_use >= 2
                except BaseException as exc:  # noqa: BLE001 - reported through the exit code
                    failed.append(exc)

            try:
                self.check_all()
                worker = threading.Thread(target=pooled_work)
                worker.start()
                worker.join()
                if failed:
                    raise failed[0]
            except BaseException:  # noqa: BLE001 - reported through the exit code
                import traceback

                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"forked child failed: {status}"

    OPS = {"alloc": 10, "drop": 4, "drop_elsewhere": 3, "resize": 2, "out": 2, "enter": 3, "exit": 3, "fork": 0.25}

    # --- checks ----------------------------------------------------------------------------

    def check_no_overlap(self) -> None:
        spans = sorted(
            (x.tensor.untyped_storage().data_ptr(), x.tensor.untyped_storage().nbytes()) for x in self.live
        )
        for (a, n), (b, _) in zip(spans, spans[1:]):
            assert a + n <= b, f"live storages overlap: [{a:#x}, +{n}) and {b:#x}"

    def check(self, x: Live) -> None:
        def compare() -> bool:
            return bool((x.tensor[: x.length] == x.value).all())

        assert _CHECKER.submit(compare).result(), f"a live tensor lost its contents ({x.length} bytes of {x.value})"

    def check_all(self) -> None:
        for x in self.live:
            self.check(x)

    def check_caps(self) -> None:
        for pool in self.pools:
            if pool.max_bytes is not None:
                mapped = sum(s["total_size"] for s in pool.segments())
                assert mapped <= pool.max_bytes, f"a pool maps {mapped} bytes over its max_bytes={pool.max_bytes}"

    # --- run -------------------------------------------------------------------------------

    def run(self, steps: int) -> None:
        try:
            self._run(steps)
        finally:
            while self.scopes:  # what a failed check left open
                self.scopes.pop()[0].__exit__(None, None, None)

    def _run(self, steps: int) -> None:
        names, weights = zip(*self.OPS.items())
        for step in range(steps):
            op = self.rng.choices(names, weights)[0]
            getattr(self, op)()
            self.counts.steps += 1
            self.counts.by_op[op] = self.counts.by_op.get(op, 0) + 1
            self.check_no_overlap()
            if self.live:
                self.check(self.live[-1])
                self.check(self.rng.choice(self.live))
            if step % 16 == 0:
                self.check_caps()
        self.check_all()
        while self.scopes:
            self.exit()
        self.live.clear()
        self.graveyard.put(None)
        self.reaper.join()
        gc.collect()
        for pool in self.pools:
            stats = pool.stats()
            assert stats.blocks_in_use == 0 and stats.bytes_in_use == 0, f"left in use: {stats}"
            assert stats.bytes_requested == 0, stats
            pool.empty_cache()
            assert pool.stats().segments == 0
        self.counts.programs += 1


def run(seeds: list[int], steps: int = 200) -> Counts:
    counts = Counts()
    for seed in seeds:
        Program(seed, counts).run(steps)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="keep running programs this long (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--steps", type=int, default=200, help="steps per program (default 200)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # so that programs may fork
    started = time.monotonic()
    counts = Counts()
    seed = args.seed
    while time.monotonic() - started < args.seconds:
        Program(seed, counts).run(args.steps)
        seed += 1
    print(
        f"native fuzz: {counts.programs} programs (seeds {args.seed}-{seed - 1}), {counts.steps} steps, "
        f"{counts.allocations} allocations, {counts.refusals} refusals, {counts.forks} forks, "
        f"{time.monotonic() - started:.0f} s: ok"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
