"""Every private PyTorch Python API poolscope relies on, in one place.

A torch upgrade that moves one of these breaks this module first, and
``tests/test_torch_compat.py`` fails loudly rather than poolscope misbehaving.
(The C++ side keeps its private APIs in ``csrc/torch_compat.cpp``.)
"""

from __future__ import annotations

import torch

__all__ = ["MIN_TORCH", "CudaAllocatorAPI", "cxx11_abi", "profiler_enabled", "torch_version"]

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


class CudaAllocatorAPI:
    """The CUDA caching allocator's private-pool calls (torch.cuda.MemPool and its thread routing).

    The CUDA engine reaches PyTorch only through this class, so that a CPU test can drive the
    engine with a fake of it, and a torch upgrade that moves these calls breaks here.
    """

    @staticmethod
    def available() -> bool:
        return (
            torch.cuda.is_available()
            and hasattr(torch.cuda, "MemPool")
            and callable(getattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool", None))
        )

    @staticmethod
    def new_pool() -> object:
        return torch.cuda.MemPool()  # type: ignore[attr-defined]  # torch >= 2.5; available() checks

    @staticmethod
    def begin(device_index: int, pool: object) -> None:
        """Route the calling thread's allocations on ``device_index`` to ``pool``."""
        torch._C._cuda_beginAllocateCurrentThreadToPool(device_index, pool.id)  # type: ignore[attr-defined]

    @staticmethod
    def end(device_index: int, pool: object) -> None:
        torch._C._cuda_endAllocateToPool(device_index, pool.id)  # type: ignore[attr-defined]

    @staticmethod
    def segments(pool: object) -> list:
        """The pool's segments in PyTorch's memory-snapshot format."""
        # The pool argument is newer than torch 2.4's stubs: the ignore covers both.
        return torch.cuda.memory_snapshot(pool.id, include_traces=False)  # type: ignore[attr-defined, call-arg]

    @staticmethod
    def empty_cache() -> None:
        torch.cuda.empty_cache()

    @staticmethod
    def record_history() -> None:
        """Record Python stacks of CUDA allocations (process-wide), so that blocks carry frames."""
        if not getattr(CudaAllocatorAPI, "_recording", False):
            torch.cuda.memory._record_memory_history(max_entries=100_000)
            CudaAllocatorAPI._recording = True  # type: ignore[attr-defined]
