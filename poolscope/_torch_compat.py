"""Every private PyTorch API poolscope relies on, in one place.

A torch upgrade that moves one of these breaks this module first, and
``tests/test_torch_compat.py`` fails loudly rather than poolscope misbehaving.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
    _pop_mode,
    _push_mode,
)
from torch.utils.dlpack import from_dlpack, to_dlpack

__all__ = [
    "TESTED_TORCH",
    "TorchDispatchMode",
    "current_stream_key",
    "dlpack_keeps",
    "dispatch_mode_stack",
    "exit_dispatch_mode",
    "has_backend_kernel",
    "infra_mode_active",
    "is_compiling",
    "no_python_dispatch",
    "profiler_enabled",
    "storage_alias",
    "torch_version",
]

# The oldest torch poolscope accepts (every API below exists there); the suite
# itself has run on torch 2.13 only.
TESTED_TORCH = (2, 4)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


if torch_version() < TESTED_TORCH:  # pragma: no cover - depends on the install
    raise ImportError(
        f"poolscope needs torch>={TESTED_TORCH[0]}.{TESTED_TORCH[1]}, found {torch.__version__}; "
        "upgrade torch"
    )

# Internal tensor work (carving a block, the DLPack round trip) must neither
# re-enter poolscope's own mode nor show up in other people's modes.
no_python_dispatch = torch._C._DisableTorchDispatch

_INFRA_KEYS = tuple(torch._C._TorchDispatchModeKey.__members__.values())
_get_dispatch_mode = torch._C._get_dispatch_mode


def infra_mode_active() -> bool:
    """True under FakeTensorMode, proxy tracing or functionalization."""
    return any(_get_dispatch_mode(key) is not None for key in _INFRA_KEYS)


profiler_enabled = torch._C._autograd._profiler_enabled


@functools.lru_cache(maxsize=None)
def _has_kernel(name: str, key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(name, key))


def has_backend_kernel(op: Any, device: torch.device) -> bool:
    """Whether ``op`` has a kernel of its own for ``device``'s backend (not only a composite one)."""
    return _has_kernel(op.name(), device.type.upper())
is_compiling = torch.compiler.is_compiling


def dispatch_mode_stack() -> list[Any]:
    return _get_current_dispatch_mode_stack()


def exit_dispatch_mode(mode: TorchDispatchMode) -> None:
    """Exit ``mode`` even when modes entered after it are still on the stack.

    Those stay, in their order, so that a misnested exit leaves nothing of
    poolscope behind and breaks nobody else's mode.
    """
    above = []
    while (stack := _get_current_dispatch_mode_stack()) and stack[-1] is not mode:
        above.append(_pop_mode())
    try:
        if _get_current_dispatch_mode_stack():
            mode.__exit__(None, None, None)
    finally:
        for other in reversed(above):
            _push_mode(other)


def storage_alias(view: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 tensor over ``view``'s bytes with a storage of its own.

    The new storage keeps ``view`` alive through the DLPack capsule, so the
    Python object of ``view`` dies exactly when the last tensor or storage
    object sharing the new storage dies: that is the release signal.
    """
    return from_dlpack(to_dlpack(view))


@functools.lru_cache(maxsize=None)
def dlpack_keeps(dtype: torch.dtype) -> bool:
    """Whether a DLPack round trip keeps ``dtype`` and odd strides (size-1 dims) exactly."""
    try:
        with no_python_dispatch():
            probe = torch.empty(4, dtype=dtype).as_strided((2, 1), (1, 7))
            out = storage_alias(probe)
    except Exception:
        return False
    return out.dtype == dtype and out.stride() == (1, 7)


def current_stream_key(device: torch.device) -> int:
    """Identify the stream new work on ``device`` is queued on (0 on CPU)."""
    if device.type == "cpu":
        return 0
    module = getattr(torch, device.type)
    return int(module.current_stream(device).stream_id)
