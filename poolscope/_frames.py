"""Where a pooled block was allocated: the captured stack, with poolscope's own frames left out."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch

__all__ = ["describe_block", "user_frame", "without_internal_frames"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_CONTEXTLIB = os.path.abspath(contextlib.__file__)

Frames = list[dict[str, Any]]


def without_internal_frames(frames: Frames) -> Frames:
    """The frames that are not poolscope's or contextlib's machinery, innermost first."""
    return [f for f in frames if not f["filename"].startswith(_PACKAGE_DIR) and f["filename"] != _CONTEXTLIB]


def user_frame(frames: Frames) -> Optional[dict[str, Any]]:
    """The innermost frame outside torch: the line that asked for the memory."""
    for frame in frames:
        if not frame["filename"].startswith(_TORCH_DIR):
            return frame
    return frames[0] if frames else None


def describe_block(block: dict[str, Any]) -> str:
    """One line for a pooled block: its size, what was asked for, and where when known."""
    text = f"{block['size'] / 2**20:.2f} MiB block ({block['requested_size']} bytes requested)"
    frame = user_frame(block["frames"])
    if frame is not None:
        text += f", allocated at {frame['filename']}:{frame['line']} in {frame['name']}"
    return text


def clean_blocks(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for block in blocks:
        block["frames"] = without_internal_frames(block["frames"])
    return blocks
