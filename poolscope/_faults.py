"""Test hooks: fail the n-th internal step, or every pool growth, to prove poolscope recovers.

Disarmed (the default) a step costs one global read. Tests arm it with
:func:`fail_step` or :func:`fail_growth`; nothing in normal use does.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Optional

__all__ = ["InjectedFault", "fail_growth", "fail_step", "should_fail_growth", "step"]

_armed: Optional[list] = None  # [countdown, exception to raise, steps seen]
_grow_failures = 0
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """Raised by an armed step when no other exception was asked for."""


def step(name: str) -> None:
    """Mark an internal step; raises when a test armed a fault for it."""
    armed = _armed
    if armed is None:
        return
    with _lock:
        armed[2].append(name)
        armed[0] -= 1
        fire = armed[0] == 0
    if fire:
        raise armed[1](f"injected fault at step {len(armed[2])} ({name})")


def should_fail_growth() -> bool:
    return _grow_failures > 0


@contextlib.contextmanager
def fail_step(n: int, exception: type[BaseException] = InjectedFault) -> Iterator[list[str]]:
    """Raise ``exception`` at the n-th internal step (1-based) inside the block; yields the steps seen."""
    global _armed
    seen: list[str] = []
    _armed = [n, exception, seen]
    try:
        yield seen
    finally:
        _armed = None


@contextlib.contextmanager
def fail_growth() -> Iterator[None]:
    """Make every attempt to grow a pool fail as if the device were out of memory."""
    global _grow_failures
    _grow_failures += 1
    try:
        yield
    finally:
        _grow_failures -= 1
