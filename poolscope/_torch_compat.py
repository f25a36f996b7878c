"""Every private PyTorch Python API poolscope relies on, in one place.

A torch upgrade that moves one of these breaks this module first, and
``tests/test_torch_compat.py`` fails loudly rather than poolscope misbehaving.
(The C++ side keeps its private APIs in ``csrc/torch_compat.cpp``.)
"""

from __future__ import annotations

import torch

__all__ = ["MIN_TORCH", "cxx11_abi", "profiler_enabled", "torch_version"]

# The oldest torch poolscope accepts; the suite itself has run on torch 2.13 only.
MIN_TORCH = (2, 4)


def torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


if torch_version() < MIN_TORCH:  # pragma: no cover - depends on the install
    raise ImportError(
        f"poolscope needs torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}; upgrade torch"
    )

# Whether a torch.profiler session is recording (scopes then add a record_function range).
profiler_enabled = torch._C._autograd._profiler_enabled


def cxx11_abi() -> bool:
    """Whether this torch was built with libstdc++'s C++11 ABI (an extension must match it)."""
    return bool(torch._C._GLIBCXX_USE_CXX11_ABI)
