"""Hypothesis properties over random allocation programs, using poolscope.testing's own helpers.

After every step of a scoped run live allocations never share bytes and keep
their contents (checked inside ``run_program``); the results equal the plain
run bit for bit; once everything is dropped the pool is back where it started.
"""

from __future__ import annotations

import threading

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poolscope
from poolscope.testing import check_accounting, run_program
from poolscope.testing.strategies import programs


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_random_programs_are_alias_free_leak_free_and_transparent(program):
    pool = poolscope.TensorPool("cpu")
    before = pool.stats()
    plain = run_program(program, scoped=False)
    pooled = run_program(program, pool=pool)
    assert len(plain.results) == len(pooled.results)
    assert all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(plain.results, pooled.results))    # Alive now: what the program escaped and the copies it kept of its results, nothing else.
    assert pool.stats().blocks_in_use <= len(pooled.escaped) + len(pooled.results)
    del pooled
    check_accounting(pool, before)


@settings(max_examples=20, deadline=None)
@given(st.lists(programs(max_steps=40), min_size=2, max_size=4))
def test_programs_in_threads_share_a_pool_safely(thread_programs):
    pool = poolscope.TensorPool("cpu")
    before = pool.stats()
    errors = []
    handed_over = []

    def worker(program):
        try:
            handed_over.append(run_program(program, pool=pool).escaped)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in thread_programs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    handed_over.clear()  # tensors allocated in other threads die here
    check_accounting(pool, before)
