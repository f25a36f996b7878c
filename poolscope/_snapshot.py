"""Pool state and history in PyTorch's memory-snapshot format.

The dict has the keys PyTorch's viewer and ``torch.cuda._memory_viz`` read:
``segments`` (each pool segment with its blocks, lent or free) and
``device_traces`` (alloc/free events per device, recorded only while a scope
with ``enable_profiling=True`` was lending). CUDA devices keep their index;
CPU comes after them, as in ``torch.cuda._memory_viz``.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Union

import torch

from ._errors import PoolscopeTypeError
from ._pool import all_pools

__all__ = ["dump_snapshot", "snapshot"]

VIEWER_PICKLE_PROTOCOL = 4


def snapshot() -> dict[str, Any]:
    """Return every pool's segments and recorded events as a PyTorch memory snapshot.

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
    cuda_count = max([cuda_count] + [(p.device.index or 0) + 1 for p in pools if p.device.type != "cpu"])
    traces: list[list[dict[str, Any]]] = [[] for _ in range(cuda_count + 1)]
    segments: list[dict[str, Any]] = []
    for pool in pools:
        slot = cuda_count if pool.device.type == "cpu" else (pool.device.index or 0)
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
        PoolscopeTypeError: when ``path`` is not a path; OSError when it cannot be written.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise PoolscopeTypeError(f"path must be a str or os.PathLike; got {path!r} of type {type(path).__name__}")
    data = snapshot()
    with open(path, "wb") as f:
        # The web viewer's own unpickler (MemoryViz.js) reads protocols 2 to 4 only.
        pickle.dump(data, f, protocol=VIEWER_PICKLE_PROTOCOL)
