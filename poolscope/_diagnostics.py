"""What poolscope tells the user: warnings at the user's line, where pooled blocks were
allocated (poolscope's own frames left out), limit refusals, and pool changes in the log."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from types import FrameType
from typing import Any, Optional

import torch

from ._errors import PoolscopeWarning
from ._stats import PoolStats

__all__ = ["clean_blocks", "describe_block", "limit_report", "log_pool_changes", "warn_at_caller"]

log = logging.getLogger("poolscope")

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_CONTEXTLIB = os.path.abspath(contextlib.__file__)

Frames = list[dict[str, Any]]


def _internal(filename: str) -> bool:
    """Machinery between the user's line and poolscope: poolscope, contextlib, wrapt."""
    return filename.startswith(_PACKAGE_DIR) or filename == _CONTEXTLIB or f"{os.sep}wrapt{os.sep}" in filename


def warn_at_caller(message: str, category: type[Warning] = PoolscopeWarning) -> None:
    """Warn, attributed to the first frame that is not poolscope's machinery: the user's line."""
    level = 1
    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level + 1)


def _user_frame(frames: Frames) -> Optional[dict[str, Any]]:
    """The innermost frame outside torch: the line that asked for the memory."""
    for frame in frames:
        if not frame["filename"].startswith(_TORCH_DIR):
            return frame
    return frames[0] if frames else None


def _installed(filename: str) -> bool:
    """A file of an installed library (transformers, timm...): not the line a user would change."""
    return f"{os.sep}site-packages{os.sep}" in filename or f"{os.sep}dist-packages{os.sep}" in filename


def describe_block(block: dict[str, Any]) -> str:
    """One line for a pooled block: its size, what was asked for, and where when known.

    When the line that allocated is in an installed library, the innermost line of the user's
    own code that led there comes too.
    """
    text = f"{block['size'] / 2**20:.2f} MiB block ({block['requested_size']} bytes requested)"
    frame = _user_frame(block["frames"])
    if frame is not None:
        text += f", allocated at {frame['filename']}:{frame['line']} in {frame['name']}"
        if _installed(frame["filename"]):
            caller = next((f for f in block["frames"] if not _installed(f["filename"])), None)
            if caller is not None:
                text += f", called from {caller['filename']}:{caller['line']} in {caller['name']}"
    return text


def clean_blocks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop poolscope's machinery from each block's frames (innermost first)."""
    for block in blocks:
        block["frames"] = [f for f in block["frames"] if not _internal(f["filename"])]
    return blocks


def limit_report(message: str, blocks: list[dict[str, Any]]) -> str:
    """A ``ScopeLimitError``'s text: the refusal, then what was alive when it happened."""
    lines = [message]
    if blocks:
        lines.append("Alive when it was refused:")
        lines += [f"  - {describe_block(b)}" for b in blocks[:20]]
        if len(blocks) > 20:
            lines.append(f"  ... and {len(blocks) - 20} more")
        if not any(b["frames"] for b in blocks):
            lines.append("(pass enable_profiling=True to see where each block was allocated)")
    return "\n".join(lines)


def log_pool_changes(before: PoolStats, after: PoolStats) -> None:
    """What a scope changed in its pool, at DEBUG level of the ``poolscope`` logger."""
    grown = after.misses - before.misses
    if grown:
        log.debug("pool %s grew: %d allocation(s) needed new memory; %d segment(s) now", after.device, grown, after.segments)
    if after.releases > before.releases:
        log.debug(
            "pool %s released %d byte(s) to the system in %d release(s); working set %d bytes",
            after.device, after.bytes_released - before.bytes_released, after.releases - before.releases,
            after.working_set_bytes,
        )
    if after.fallbacks > before.fallbacks:
        log.debug("pool %s: %d allocation(s) served by the ordinary allocator", after.device, after.fallbacks - before.fallbacks)
