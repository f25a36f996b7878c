"""Pool state and history in PyTorch's memory-snapshot format.

The dict has the keys PyTorch's viewer and ``torch.cuda._memory_viz`` read:
``segments`` (each pool block is one segment holding one block, active or
inactive) and ``device_traces`` (alloc/free events per device, recorded only
while a scope with ``enable_profiling=True`` was lending). CUDA devices keep
their index; CPU comes after them, as in ``torch.cuda._memory_viz``.
"""

from __future__ import annotations

import os
import pickle
import sys
from types import FrameType
from typing import Any, Optional, Union

import torch

from ._pool import all_pools

__all__ = ["capture_frames", "dump_snapshot", "snapshot"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# Frames of poolscope and of the machinery that calls a dispatch mode say nothing about the caller.
_SKIPPED_FILES = frozenset(
    os.path.join(_TORCH_DIR, *parts)
    for parts in (("_dynamo", "eval_frame.py"), ("_compile.py",), ("utils", "_python_dispatch.py"))
)
FRAME_LIMIT = 32
VIEWER_PICKLE_PROTOCOL = 4


def capture_frames(skip: int = 1) -> list[dict[str, Any]]:
    """The caller's Python stack, innermost first, without poolscope's own frames."""
    frames: list[dict[str, Any]] = []
    frame: Optional[FrameType] = sys._getframe(skip)
    while frame is not None and len(frames) < FRAME_LIMIT:
        code = frame.f_code
        filename = code.co_filename
        if not filename.startswith(_PACKAGE_DIR) and filename not in _SKIPPED_FILES:
            frames.append({"filename": filename, "line": frame.f_lineno, "name": code.co_name})
        frame = frame.f_back
    return frames


def snapshot() -> dict[str, Any]:
    """Return every pool's blocks and recorded events as a PyTorch memory snapshot.

    Example::

        with poolscope.pool_scope(enable_profiling=True):
            model(x)
        snap = poolscope.snapshot()
        from torch.cuda import _memory_viz
        print(_memory_viz.segsum(snap))

    Returns:
        A dict with ``segments`` and ``device_traces`` (and an empty ``allocator_settings``).
    """
    cuda_count = torch.cuda.device_count() if torch.cuda.is_initialized() else 0
    pools = all_pools()
    cuda_count = max([cuda_count] + [p.device.index + 1 for p in pools if p.device.type != "cpu"])
    traces: list[list[dict[str, Any]]] = [[] for _ in range(cuda_count + 1)]
    segments: list[dict[str, Any]] = []
    for pool in pools:
        slot = cuda_count if pool.device.type == "cpu" else pool.device.index
        for segment in pool.segments():
            segment["device"] = slot
            segments.append(segment)
        traces[slot].extend(pool.trace())
    for events in traces:
        events.sort(key=lambda e: e["time_us"])
    return {"segments": segments, "device_traces": traces, "allocator_settings": {}}


def dump_snapshot(path: Union[str, os.PathLike]) -> None:
    """Write :func:`snapshot` to ``path`` as a pickle, loadable by PyTorch's memory viewer.

    Example::

        poolscope.dump_snapshot("pool.pickle")
        # python -m torch.cuda._memory_viz trace_plot pool.pickle -o pool.html

    Raises:
        TypeError: when ``path`` is not a path; OSError when it cannot be written.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {path!r} of type {type(path).__name__}")
    data = snapshot()
    with open(path, "wb") as f:
        # The web viewer's own unpickler (MemoryViz.js) reads protocols 2 to 4 only.
        pickle.dump(data, f, protocol=VIEWER_PICKLE_PROTOCOL)
