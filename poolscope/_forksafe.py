"""poolscope's Python locks: new and free in a forked child, and reentrant for signal handlers.

A DataLoader worker or a multiprocessing child forks while other threads of the parent may be
inside poolscope (a scope's exit recording its figures, a pool being made). A plain
``threading.Lock`` held by such a thread at the fork stays held in the child forever, and the
child's first scope hangs on it. The state these locks guard is consistent in the child
(each critical section is a few Python statements the forking thread was not in).

They are reentrant: a signal handler runs on the thread it interrupted, and one that exits a
scope while that thread's own scope exit is recording its figures must not wait for itself.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

__all__ = ["ForkSafeLock"]

_ALL: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()


class ForkSafeLock:
    """A ``threading.RLock`` that a forked child gets back unlocked."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self) -> None:
        self._lock = threading.RLock()
        _ALL.add(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def _renew_in_child() -> None:
    for lock in list(_ALL):
        lock._lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # creates nothing: runs only in a forked child
    os.register_at_fork(after_in_child=_renew_in_child)
