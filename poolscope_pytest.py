"""pytest plugin that installing poolscope registers (entry point ``pytest11``).

- the ``pool_leak_check`` fixture: the test runs inside
  :func:`poolscope.testing.assert_no_leaks` and fails if a pooled block it
  allocated outlives it;
- ``pytest --poolscope-leak-check``: the same for every test of the run;
- ``@pytest.mark.poolscope_leak_check(allow_escapes=N)`` sets how many blocks may outlive a test.

This module imports nothing heavy: without the option or the fixture,
loading it costs nothing (torch and poolscope are imported only when a check runs).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

_FIXTURE = "pool_leak_check"
_MARKER = "poolscope_leak_check"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("poolscope")
    group.addoption(
        "--poolscope-leak-check",
        action="store_true",
        default=False,
        help="fail any test that leaves a pooled tensor alive (poolscope.testing.assert_no_leaks)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{_MARKER}(allow_escapes=0): check this test for pooled-memory leaks, allowing N escapes"
    )


@pytest.fixture
def pool_leak_check() -> bool:
    """Run this test inside poolscope.testing.assert_no_leaks (the check wraps the test call)."""
    return True


def _wanted(item: pytest.Item) -> bool:
    return (
        item.config.getoption("--poolscope-leak-check")
        or _FIXTURE in getattr(item, "fixturenames", ())
        or item.get_closest_marker(_MARKER) is not None
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, None]:
    if not _wanted(item):
        yield
        return
    from poolscope.testing import assert_no_leaks

    marker = item.get_closest_marker(_MARKER)
    allow = marker.kwargs.get("allow_escapes", 0) if marker is not None else 0
    __tracebackhide__ = True
    check = assert_no_leaks(allow_escapes=allow, enable_profiling=True)
    check.__enter__()
    outcome = yield
    excinfo = outcome.excinfo
    try:
        check.__exit__(*(excinfo or (None, None, None)))
    except AssertionError as exc:
        outcome.force_exception(exc)
