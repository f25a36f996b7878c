"""Scope figures against a model: every scope's bytes and blocks alive, peak and counts, however
the scopes nest, exit out of order, reset their peaks or outlive their tensors (the engine charges
a block in O(1) whatever the depth: csrc/charging.cpp)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import poolscope

pytestmark = pytest.mark.pools
KiB = 1024


@dataclass
class Model:
    """What each scope should report, kept by brute force."""

    open: bool = True
    alive: dict[int, int] = field(default_factory=dict)  # tensor id -> block size, for the tensors it counts
    peak: int = 0
    routed: int = 0
    bytes_routed: int = 0

    def bytes(self) -> int:
        return sum(self.alive.values())


def check(scopes: list, models: list[Model]) -> None:
    for scope, model in zip(scopes, models):
        s = scope._backend.stats()  # the engine's figures: live after exit too (the report's escapes)
        assert (s.bytes_in_use, s.escaped, s.peak_bytes_in_use, s.allocations_routed, s.bytes_routed) == (
            model.bytes(), len(model.alive), model.peak, model.routed, model.bytes_routed
        ), (scope, model)


ops = st.lists(
    st.tuples(st.sampled_from(["enter", "enter", "exit", "alloc", "alloc", "alloc", "free", "reset"]),
              st.integers(0, 1 << 30)),
    min_size=1, max_size=60,
)


def run(program: list[tuple[str, int]], pool: poolscope.TensorPool) -> None:
    scopes: list = []  # every scope made, in order
    models: list[Model] = []
    tensors: dict[int, torch.Tensor] = {}
    serial = 0
    for op, arg in program:
        opened = [i for i, m in enumerate(models) if m.open]
        if op == "enter" or not opened and op in ("alloc", "exit", "reset"):
            scope = poolscope.pool_scope(pool=pool, threshold=4 * KiB)
            scope.__enter__()
            scopes.append(scope)
            models.append(Model())
        elif op == "exit":  # any open scope, not only the innermost
            i = opened[arg % len(opened)]
            scopes[i].__exit__(None, None, None)
            models[i].open = False
        elif op == "alloc":
            before = pool.stats().bytes_in_use
            nbytes = 4 * KiB + arg % (96 * KiB)
            serial += 1
            tensors[serial] = torch.empty(nbytes, dtype=torch.uint8)
            size = pool.stats().bytes_in_use - before  # the block's size (a granule multiple, maybe more)
            for i in opened:
                m = models[i]
                m.alive[serial] = size
                m.routed += 1
                m.bytes_routed += nbytes
                m.peak = max(m.peak, m.bytes())
        elif op == "free" and tensors:
            key = sorted(tensors)[arg % len(tensors)]
            del tensors[key]
            for m in models:
                m.alive.pop(key, None)
        elif op == "reset":
            i = opened[arg % len(opened)]
            scopes[i].reset_peak()
            models[i].peak = models[i].bytes()
        check(scopes, models)
    tensors.clear()
    for m in models:
        m.alive.clear()
    check(scopes, models)
    for i, m in enumerate(models):
        if m.open:
            scopes[i].__exit__(None, None, None)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_scope_figures_match_a_model_whatever_the_nesting_exits_and_frees(program):
    run(program, poolscope.TensorPool("cpu", release_idle_s=None))


def test_figures_of_scopes_two_hundred_deep_match_a_model():
    program = [("enter", 0)] * 200 + [("alloc", k) for k in range(50)]
    program += [("free", 7 * k) for k in range(20)] + [("exit", 3 * k) for k in range(100)]
    program += [("alloc", k) for k in range(20)] + [("free", 0)] * 30
    run(program, poolscope.TensorPool("cpu", release_idle_s=None))


def free_on_another_thread(tensors: list) -> None:
    thread = threading.Thread(target=tensors.pop)  # the popped tensor dies on that thread
    thread.start()
    thread.join()


def test_a_tensor_freed_by_another_thread_leaves_every_scope_that_counted_it():
    pool = poolscope.TensorPool("cpu", release_idle_s=None)
    with poolscope.pool_scope(pool=pool, threshold=4 * KiB) as outer:
        with poolscope.pool_scope(pool=pool, threshold=4 * KiB) as inner:
            kept = [torch.empty(64 * KiB, dtype=torch.uint8) for _ in range(3)]
            free_on_another_thread(kept)
            assert inner.stats.escaped == 2 and outer.stats.escaped == 2
            assert inner.stats.peak_bytes_in_use == outer.stats.peak_bytes_in_use == 3 * 64 * KiB
        free_on_another_thread(kept)  # an escaped tensor
        assert inner._backend.stats().escaped == 1 and outer.stats.escaped == 1
    del kept
    assert inner._backend.stats().bytes_in_use == outer._backend.stats().bytes_in_use == 0
