"""Hypothesis properties over random allocation programs.

A program allocates (through several factories), takes views, keeps only a
storage, drops references, writes, and opens and closes nested scopes; some
tensors escape the scope they were made in. The same program runs without
any scope for comparison. Properties checked after every step:

* live allocations never share bytes;
* every live tensor still holds what was written into it;
* the program's results equal the unscoped run bit for bit;
* when everything is dropped, the pool is back where it started.
"""

from __future__ import annotations

import contextlib
import gc
import threading

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import poolscope

KiB = 1024
THRESHOLD = 16 * KiB

FACTORIES = {
    "empty": lambda n, dt: torch.empty(n, dtype=dt).fill_(1),
    "zeros": lambda n, dt: torch.zeros(n, dtype=dt),
    "ones": lambda n, dt: torch.ones(n, dtype=dt),
    "randn": lambda n, dt: torch.randn(n, dtype=torch.float32).to(dt),
    "full": lambda n, dt: torch.full((n,), 3, dtype=dt),
    "zeros_like": lambda n, dt: torch.zeros_like(torch.empty(0, dtype=dt).new_empty(n)),
}
DTYPES = [torch.float32, torch.float64, torch.int32, torch.uint8, torch.bfloat16]

# A few fixed sizes make blocks of one size class meet often.
common = st.tuples(st.sampled_from([4 * KiB, 16 * KiB, 16 * KiB + 3]), st.just(torch.float32))
anything = st.tuples(st.integers(1, 64 * KiB), st.sampled_from(DTYPES))
alloc = st.builds(
    lambda name, size: ("alloc", name, *size),
    st.sampled_from(sorted(FACTORIES)),
    st.one_of(common, anything),
)
step = st.one_of(
    alloc,
    alloc,
    alloc,
    alloc,
    st.tuples(st.just("view"), st.integers(0, 50)),
    st.tuples(st.just("storage"), st.integers(0, 50)),
    st.tuples(st.just("drop"), st.integers(0, 50)),
    st.tuples(st.just("write"), st.integers(0, 50), st.integers(-100, 100)),
    st.tuples(st.just("enter"), st.sampled_from([0, THRESHOLD, 256 * KiB])),
    st.tuples(st.just("exit")),
)
programs = st.lists(step, min_size=20, max_size=60)


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _alloc(live, results, name, n, dtype) -> None:
    t = FACTORIES[name](n, dtype)
    results.append(t.clone())
    live.append((len(results), t, t.clone()))


def _touch(live, results, op) -> None:
    kind, i = op[0], op[1] % len(live)
    ident, handle, expected = live[i]
    if kind == "drop":
        del live[i]
    elif not isinstance(handle, torch.Tensor):
        return
    elif kind == "view" and handle.numel() > 1:
        live[i] = (ident, handle[1:], expected[1:])
    elif kind == "storage":
        storage = handle.untyped_storage()
        live[i] = (ident, storage, _bytes_of(storage).clone())
    elif kind == "write":
        handle.fill_(op[2])
        expected.fill_(op[2])
        results.append(handle.clone())


def run(program, scoped: bool, pool: poolscope.TensorPool | None):
    """Interpret ``program``; return what it computed.

    Each step runs in a function of its own so that no stray local keeps a
    dropped tensor alive.
    """
    torch.manual_seed(0)
    live: list[tuple[int, object, torch.Tensor]] = []  # (allocation id, handle, expected contents)
    results: list[torch.Tensor] = []
    with contextlib.ExitStack() as outer:
        if scoped:  # the program runs inside a scope that routes everything
            outer.enter_context(poolscope.pool_scope(threshold=0, pool=pool))
        scopes = outer.enter_context(contextlib.ExitStack())
        for op in program:
            if op[0] == "alloc":
                _alloc(live, results, *op[1:])
            elif op[0] == "enter":
                if scoped:
                    scopes.enter_context(poolscope.pool_scope(threshold=op[1], pool=pool))
            elif op[0] == "exit":
                scopes.close()
            elif live:
                _touch(live, results, op)
            if scoped:
                check_invariants(live)
    return results


def check_invariants(live) -> None:
    ranges: dict[tuple[int, int], set[int]] = {}
    for ident, handle, expected in live:
        storage = handle if isinstance(handle, torch.UntypedStorage) else handle.untyped_storage()
        start = storage.data_ptr()
        ranges.setdefault((start, start + storage.nbytes()), set()).add(ident)
        actual = handle if isinstance(handle, torch.Tensor) else _bytes_of(handle)
        assert torch.equal(actual, expected), f"allocation {ident} lost its contents"
    for span, idents in ranges.items():
        assert len(idents) == 1 or span[0] == span[1], f"allocations {sorted(idents)} share their memory"
    spans = sorted(span for span in ranges if span[0] != span[1])
    for (s1, e1), (s2, _) in zip(spans, spans[1:]):
        assert e1 <= s2, f"two live allocations overlap at {hex(s2)}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs)
def test_random_programs_are_alias_free_leak_free_and_transparent(program):
    pool = poolscope.TensorPool("cpu")
    plain = run(program, scoped=False, pool=None)
    pooled = run(program, scoped=True, pool=pool)
    assert len(plain) == len(pooled)
    for a, b in zip(plain, pooled):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    del pooled
    gc.collect()
    assert pool.stats().bytes_in_use == 0


@settings(max_examples=20, deadline=None)
@given(st.lists(programs, min_size=2, max_size=4))
def test_programs_in_threads_share_a_pool_safely(thread_programs):
    pool = poolscope.TensorPool("cpu")
    errors = []

    def worker(program):
        try:
            run([("enter", 0), *program], scoped=True, pool=pool)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in thread_programs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    gc.collect()
    assert pool.stats().bytes_in_use == 0
