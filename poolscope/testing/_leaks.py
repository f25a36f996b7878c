"""``assert_no_leaks``: fail when pooled memory lent inside a block outlives it."""

from __future__ import annotations

import contextlib
import gc
from typing import Any, Optional

from .._config import DEFAULT_THRESHOLD, ByteSize, DeviceLike
from .._pool import Lease
from .._scope import PoolScope

__all__ = ["assert_no_leaks"]


def _describe(lease: Lease) -> str:
    mib = lease.key[1] / 2**20
    where = ""
    if lease.frames:
        top = lease.frames[0]
        where = f", allocated at {top['filename']}:{top['line']} in {top['name']}"
    return (
        f"  - {mib:.2f} MiB block for a tensor of shape {tuple(lease.shape)}, dtype {lease.dtype} "
        f"({lease.requested} bytes requested){where}"
    )


class assert_no_leaks(contextlib.ContextDecorator):  # noqa: N801 - used like a function
    """Run the body in a pool scope and fail if memory it pooled is still alive afterwards.

    At exit, after a garbage collection, every block lent inside the body
    (nested scopes and decorated forwards included) must be back, apart from
    ``allow_escapes`` of them (outputs you deliberately keep).

    Example::

        from poolscope.testing import assert_no_leaks

        def test_attention_does_not_leak():
            module = Attention()
            with assert_no_leaks(enable_profiling=True):
                module(q, k, v)                      # output dropped: nothing may stay

        @assert_no_leaks(allow_escapes=1)            # also a decorator
        def test_forward_returns_one_tensor(): ...

    Args:
        device: as for :func:`poolscope.pool_scope`.
        allow_escapes: how many pooled blocks may outlive the body.
        threshold: as for :func:`poolscope.pool_scope`.
        enable_profiling: record where each block was allocated, so that the
            failure message names the file and line.

    Raises:
        AssertionError: listing each leaked block (size, shape, dtype, and the
            allocating line when profiling) when more than ``allow_escapes`` remain.
        TypeError, ValueError: for bad arguments.
    """

    def __init__(
        self,
        device: Optional[DeviceLike] = None,
        *,
        allow_escapes: int = 0,
        threshold: ByteSize = DEFAULT_THRESHOLD,
        enable_profiling: bool = False,
    ) -> None:
        if isinstance(allow_escapes, bool) or not isinstance(allow_escapes, int) or allow_escapes < 0:
            raise (ValueError if isinstance(allow_escapes, int) and not isinstance(allow_escapes, bool) else TypeError)(
                f"allow_escapes must be an int >= 0; got {allow_escapes!r}"
            )
        self._settings = dict(device=device, threshold=threshold, enable_profiling=enable_profiling)
        self._allow = allow_escapes
        self._scope = PoolScope(device, threshold=threshold, enable_profiling=enable_profiling, name=None)

    def _recreate_cm(self) -> assert_no_leaks:
        return assert_no_leaks(allow_escapes=self._allow, **self._settings)  # type: ignore[arg-type]

    @property
    def scope(self) -> PoolScope:
        """The scope the body runs in; its ``stats`` are final after exit."""
        return self._scope

    def __enter__(self) -> assert_no_leaks:
        self._scope.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        __tracebackhide__ = True  # pytest: show the test, not this frame
        scope = self._scope
        # Collect before the scope counts, so that garbage cycles are not leaks.
        gc.collect()
        scope.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        leaks = scope.live_leases()
        if len(leaks) > self._allow:
            lines = "\n".join(_describe(lease) for lease in leaks)
            raise AssertionError(
                f"assert_no_leaks: {len(leaks)} pooled block(s) still alive after the body "
                f"(allowed: {self._allow}):\n{lines}\n"
                "Something kept a tensor created inside the body (a cache, a global list, a hook, "
                "self.<attribute>); drop it, or raise allow_escapes for outputs you keep."
            )
