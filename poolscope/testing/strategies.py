"""Hypothesis strategies for poolscope's properties (needs the ``hypothesis`` package).

Example::

    from hypothesis import given
    from poolscope.testing import check_accounting, run_program
    from poolscope.testing.strategies import programs

    @given(programs())
    def test_pool_stays_sound(program):
        before = pool.stats()
        plain = run_program(program, scoped=False)
        pooled = run_program(program, pool=pool)
        assert all(torch.equal(a, b) for a, b in zip(plain.results, pooled.results))
        del pooled
        check_accounting(pool, before)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from hypothesis import strategies as st

from ._programs import FACTORIES

__all__ = ["DTYPES", "dtypes", "programs", "shapes_crossing", "tensor_specs"]

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool)


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """Dtypes poolscope must handle, integers and bool included."""
    return st.sampled_from(DTYPES)


def shapes_crossing(
    threshold: int, dtype: torch.dtype, *, max_dims: int = 4, spread: float = 4.0
) -> st.SearchStrategy[tuple[int, ...]]:
    """Shapes whose ``dtype`` tensors need between ``threshold / spread`` and ``threshold * spread`` bytes.

    About half fall below the threshold and half reach it, exactly-at included.
    """
    itemsize = dtype.itemsize
    low = max(1, int(threshold / spread) // itemsize)
    high = max(low + 1, int(threshold * spread) // itemsize)
    exact = max(1, -(-threshold // itemsize))

    def split(numel: int, draw_dims: list[int]) -> tuple[int, ...]:
        dims = []
        rest = numel
        for d in draw_dims:
            if d > 1 and rest % d == 0:
                dims.append(d)
                rest //= d
        return (*dims, rest)

    numels = st.one_of(st.just(exact), st.just(max(1, exact - 1)), st.integers(low, high))
    return st.builds(split, numels, st.lists(st.sampled_from([2, 3, 4, 8, 16]), max_size=max_dims - 1))


def tensor_specs(threshold: int) -> st.SearchStrategy[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) pairs on both sides of ``threshold``."""
    return dtypes().flatmap(lambda dt: st.tuples(shapes_crossing(threshold, dt), st.just(dt)))


def programs(
    *,
    factories: Optional[Sequence[str]] = None,
    sizes: Sequence[int] = (4096, 16384, 16387),
    max_numel: int = 1 << 16,
    min_steps: int = 20,
    max_steps: int = 60,
    thresholds: Sequence[int] = (0, 1 << 14, 1 << 18),
) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    """Random programs for :func:`poolscope.testing.run_program`.

    A few fixed ``sizes`` (float32) make blocks of one size class meet often,
    which is where aliasing bugs live; other allocations take any size and dtype.
    """
    names = sorted(FACTORIES) if factories is None else list(factories)
    common = st.tuples(st.sampled_from(list(sizes)), st.just(torch.float32))
    anything = st.tuples(st.integers(1, max_numel), st.sampled_from([d for d in DTYPES if d is not torch.bool]))
    alloc = st.builds(lambda name, size: ("alloc", name, *size), st.sampled_from(names), st.one_of(common, anything))
    index = st.integers(0, 50)
    step = st.one_of(
        alloc,
        alloc,
        alloc,
        alloc,
        st.tuples(st.just("view"), index),
        st.tuples(st.just("storage"), index),
        st.tuples(st.just("drop"), index),
        st.tuples(st.just("escape"), index),
        st.tuples(st.just("write"), index, st.integers(-100, 100)),
        st.tuples(st.just("enter"), st.sampled_from(list(thresholds))),
        st.tuples(st.just("exit")),
    )
    return st.lists(step, min_size=min_steps, max_size=max_steps)
