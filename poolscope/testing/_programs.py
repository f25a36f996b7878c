"""Random allocation programs and the invariants poolscope keeps while they run.

A program is a list of steps, each a tuple:

- ``("alloc", factory, numel, dtype)``: call ``factories[factory](numel, dtype)``;
- ``("view", i)``: replace live handle ``i`` by a view of it;
- ``("storage", i)``: keep only its ``untyped_storage()``;
- ``("write", i, value)``: fill it with ``value``;
- ``("drop", i)``: forget it;
- ``("escape", i)``: hand it to the caller, who keeps it after the run;
- ``("enter", threshold)`` / ``("exit",)``: open or close a nested pool scope.

Indices wrap around the live handles. :func:`run_program` runs a program with
or without scopes and checks, after every step of a scoped run, that live
allocations never share bytes and still hold what was written into them.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .._pool import TensorPool
from .._scope import pool_scope
from .._stats import PoolStats

__all__ = ["FACTORIES", "Program", "ProgramResult", "check_accounting", "check_contents", "check_no_shared_bytes", "run_program"]

Step = tuple[Any, ...]
Program = Sequence[Step]
Handle = Union[torch.Tensor, torch.UntypedStorage]
Factory = Callable[[int, torch.dtype], torch.Tensor]

FACTORIES: dict[str, Factory] = {
    "empty": lambda n, dt: torch.empty(n, dtype=dt).fill_(1),
    "zeros": lambda n, dt: torch.zeros(n, dtype=dt),
    "ones": lambda n, dt: torch.ones(n, dtype=dt),
    "full": lambda n, dt: torch.full((n,), 3, dtype=dt),
    "randn": lambda n, dt: torch.randn(n).to(dt),
    "zeros_like": lambda n, dt: torch.zeros_like(torch.empty(0, dtype=dt).new_empty(n)),
    "arange": lambda n, dt: torch.arange(n, dtype=torch.int64).to(dt),
}


@dataclass
class _Live:
    ident: int
    handle: Handle
    expected: torch.Tensor  # what its bytes must be


@dataclass
class ProgramResult:
    """What a program computed (copies, for comparing runs) and the tensors it escaped."""

    results: list[torch.Tensor] = field(default_factory=list)
    escaped: list[Handle] = field(default_factory=list)


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def check_no_shared_bytes(handles: Iterable[tuple[int, Handle]]) -> None:
    """Fail if two different allocations' live storages overlap.

    ``handles`` pairs an allocation id with a tensor or storage; several
    handles of one allocation (views, its storage) may of course share bytes.
    """
    spans: dict[tuple[int, int], set[int]] = {}
    for ident, handle in handles:
        storage = handle if isinstance(handle, torch.UntypedStorage) else handle.untyped_storage()
        start = storage.data_ptr()
        if storage.nbytes():
            spans.setdefault((start, start + storage.nbytes()), set()).add(ident)
    for span, idents in spans.items():
        assert len(idents) == 1, f"allocations {sorted(idents)} share the bytes at {hex(span[0])}"
    ordered = sorted(spans)
    for (_, end), (start, _) in zip(ordered, ordered[1:]):
        assert end <= start, f"two live allocations overlap at {hex(start)}"


def check_contents(handle: Handle, expected: torch.Tensor, ident: Any = "?") -> None:
    """Fail unless ``handle`` holds exactly ``expected`` (bytes, for a storage)."""
    actual = handle if isinstance(handle, torch.Tensor) else _bytes_of(handle)
    assert torch.equal(actual, expected), f"allocation {ident} lost its contents"


def check_accounting(pool: TensorPool, before: PoolStats) -> None:
    """After everything has died, fail unless ``pool`` holds no more than it did ``before``."""
    gc.collect()
    after = pool.stats()
    assert after.bytes_in_use == before.bytes_in_use, (
        f"{after.bytes_in_use - before.bytes_in_use} bytes of {pool.device} pool blocks are still lent"
    )
    assert after.blocks_in_use == before.blocks_in_use


def _touch(live: list[_Live], result: ProgramResult, step: Step) -> None:
    kind, i = step[0], step[1] % len(live)
    item = live[i]
    if kind == "drop":
        del live[i]
    elif kind == "escape":
        result.escaped.append(live.pop(i).handle)
    elif not isinstance(item.handle, torch.Tensor):
        return
    elif kind == "view" and item.handle.numel() > 1:
        live[i] = _Live(item.ident, item.handle[1:], item.expected[1:])
    elif kind == "storage":
        storage = item.handle.untyped_storage()
        live[i] = _Live(item.ident, storage, _bytes_of(storage).clone())
    elif kind == "write":
        item.handle.fill_(step[2])
        item.expected.fill_(step[2])
        result.results.append(item.handle.clone())


def _alloc(live: list[_Live], result: ProgramResult, factories: dict[str, Factory], step: Step) -> None:
    tensor = factories[step[1]](step[2], step[3])
    result.results.append(tensor.clone())
    live.append(_Live(len(result.results), tensor, tensor.clone()))


def run_program(
    program: Program,
    *,
    scoped: bool = True,
    pool: Optional[TensorPool] = None,
    factories: Optional[dict[str, Factory]] = None,
    threshold: int = 0,
) -> ProgramResult:
    """Run ``program``; with ``scoped``, inside a scope and checking invariants after every step.

    Example::

        program = [("alloc", "zeros", 1 << 18, torch.float32), ("view", 0), ("enter", 0),
                   ("alloc", "randn", 1 << 18, torch.float32), ("exit",), ("drop", 0)]
        pooled = run_program(program, pool=pool)
        plain = run_program(program, scoped=False)
        assert all(torch.equal(a, b) for a, b in zip(plain.results, pooled.results))

    Args:
        program: the steps (see the module docstring).
        scoped: run inside ``pool_scope(threshold=threshold, pool=pool)``; False runs plain.
        pool: the pool to use (the device's shared pool when None).
        factories: name -> ``f(numel, dtype) -> torch.Tensor``, called by each
            ``("alloc", name, numel, dtype)`` step; defaults to :data:`FACTORIES`. Add a
            function that runs your module and returns what it made, and pass its name to
            ``strategies.programs(factories=[...])`` (docs/testing.md has an example).
        threshold: the outer scope's threshold.

    Returns:
        Copies of every allocation and write (compare a scoped run with a plain one), and the
        escaped handles, which the caller now owns.
    """
    torch.manual_seed(0)
    factories = FACTORIES if factories is None else factories
    live: list[_Live] = []
    result = ProgramResult()
    with contextlib.ExitStack() as outer:
        if scoped:
            outer.enter_context(pool_scope(threshold=threshold, pool=pool))
        nested = outer.enter_context(contextlib.ExitStack())
        for step in program:
            kind = step[0]
            if kind == "alloc":
                _alloc(live, result, factories, step)
            elif kind == "enter":
                if scoped:
                    nested.enter_context(pool_scope(threshold=step[1], pool=pool))
            elif kind == "exit":
                nested.close()
            elif live:
                _touch(live, result, step)
            if scoped:
                check_no_shared_bytes((item.ident, item.handle) for item in live)
                for item in live:
                    check_contents(item.handle, item.expected, item.ident)
    return result
