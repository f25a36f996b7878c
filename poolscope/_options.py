"""A scope's options, validated as a whole: the one place ``ScopeOptions`` are built.

``pool_scope``, ``pooled_forward``, ``testing.assert_no_leaks`` and the hand-written pool
compatibility layer call :func:`scope_options` by keyword; each value is parsed by
``_config``, and the checks that involve several arguments are here.
"""

from __future__ import annotations

from typing import Optional

from ._config import (
    CAPTURE_MODES,
    ON_LIMIT,
    ByteSize,
    DeviceLike,
    check_bool,
    check_name,
    parse_choice,
    parse_device,
    parse_limit,
    parse_threshold,
)
from ._diagnostics import warn_at_caller
from ._errors import PoolscopeTypeError, PoolscopeValueError
from ._pool import TensorPool
from .engines.base import ScopeOptions

__all__ = ["CAPTURE_REMOVED_IN", "scope_options"]

CAPTURE_REMOVED_IN = "0.3.0"  # deprecated in 0.2.1 (2026-12-02); see CHANGELOG.md


def scope_options(
    *,
    device: Optional[DeviceLike] = None,
    threshold: ByteSize,
    capture: str = "all",
    pool: Optional[TensorPool] = None,
    max_bytes: Optional[ByteSize] = None,
    on_limit: str = "raise",
    strict: bool = False,
    name: Optional[str] = None,
    enable_profiling: bool = False,
    counts_exits: bool = True,
) -> ScopeOptions:
    """Validate a scope's arguments; raise an error naming the bad one and what is allowed."""
    dev = None if device is None else parse_device(device)
    if parse_choice(capture, "capture", CAPTURE_MODES) == "factories":
        warn_at_caller(
            "pool_scope(capture='factories') is deprecated and means the same as the default: the native engine "
            "sees every allocation, factory or not, and pools each one of at least `threshold` bytes; drop the "
            f"argument (it goes in poolscope {CAPTURE_REMOVED_IN})",
            DeprecationWarning,
        )
    if pool is not None and not isinstance(pool, TensorPool):
        raise PoolscopeTypeError(
            f"pool must be a poolscope.TensorPool or None; got {pool!r} of type {type(pool).__name__}"
        )
    if max_bytes is not None and ((dev is not None and dev.type == "cuda") or (pool is not None and pool.device.type == "cuda")):
        raise PoolscopeValueError(
            f"max_bytes={max_bytes!r} cannot be enforced on CUDA: torch.cuda.MemPool has no per-pool limit; "
            "drop max_bytes for CUDA scopes (torch.cuda.set_per_process_memory_fraction bounds the whole device)"
        )
    if pool is not None and dev is not None and pool.device != dev:
        raise PoolscopeValueError(
            f"pool is on {pool.device} but device={str(dev)!r}; pass one of them or make them agree"
        )
    return ScopeOptions(
        threshold=parse_threshold(threshold),
        max_bytes=parse_limit(max_bytes, "max_bytes"),
        on_limit=parse_choice(on_limit, "on_limit", ON_LIMIT),
        strict=check_bool(strict, "strict"),
        name=check_name(name),
        profiling=check_bool(enable_profiling, "enable_profiling"),
        counts_exits=counts_exits,
        device=dev,
        pool=pool,
    )
