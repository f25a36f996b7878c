"""Test helpers: prove that modules give every pooled block back.

``assert_no_leaks`` is a context manager and decorator; the ``pool_leak_check``
fixture and ``pytest --poolscope-leak-check`` come from the pytest plugin that
installing poolscope registers. Hypothesis strategies and the invariant
checkers live in :mod:`poolscope.testing.strategies` (needs hypothesis).
"""

from ._leaks import assert_no_leaks
from ._programs import (
    FACTORIES,
    Program,
    check_accounting,
    check_contents,
    check_no_shared_bytes,
    run_program,
)

__all__ = [
    "FACTORIES",
    "Program",
    "assert_no_leaks",
    "check_accounting",
    "check_contents",
    "check_no_shared_bytes",
    "run_program",
]
