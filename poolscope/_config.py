"""Validation and parsing of user-facing settings."""

from __future__ import annotations

import math
import re
from typing import Union

import torch

DEFAULT_THRESHOLD = 1 << 20  # 1 MiB, the seed's rule
CAPTURE_MODES = ("factories", "all")

ByteSize = Union[int, str]
DeviceLike = Union[str, torch.device, int]

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_SIZE_HELP = "an int number of bytes >= 0 or a string such as '1MiB', '512KB', '2GB' (KB=1000, KiB=1024)"


def parse_bytes(value: object, what: str) -> int:
    """Turn an int or a string such as ``"1.5MiB"`` into a number of bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{what} must be {_SIZE_HELP}; got {value!r} of type {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must be >= 0 bytes; got {value}")
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"{what} must be {_SIZE_HELP}; got {value!r}")
    number = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(number):
        raise ValueError(f"{what} is too large: {value!r}")
    return math.ceil(number)


def parse_threshold(value: object) -> int:
    return parse_bytes(value, "threshold")


def parse_cap(value: object) -> int | None:
    if value is None:
        return None
    return parse_bytes(value, "max_cached_bytes")


def parse_device(value: object, what: str = "device") -> torch.device:
    """Normalise a device argument; ``cuda`` without an index means the current one."""
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        raise TypeError(
            f"{what} must be a str, torch.device or int such as 'cpu' or 'cuda:0'; "
            f"got {value!r} of type {type(value).__name__}"
        )
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{what} {value!r} is not a device: {exc}") from None
    if device.type == "meta":
        raise ValueError(f"{what} {value!r} has no memory to pool; use 'cpu' or an accelerator such as 'cuda'")
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        is_available = getattr(module, "is_available", None)
        if is_available is None or not is_available():
            raise ValueError(f"{what} {value!r} is not available on this machine; use 'cpu'")
        if device.index is None:
            device = torch.device(device.type, module.current_device())
    return device


def parse_capture(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"capture must be one of {CAPTURE_MODES}; got {value!r} of type {type(value).__name__}")
    if value not in CAPTURE_MODES:
        raise ValueError(f"capture must be one of {CAPTURE_MODES}; got {value!r}")
    if value == "all":
        raise NotImplementedError(
            "capture='all' (routing the outputs of every ATen op) is reserved and not implemented yet; "
            "use capture='factories'"
        )
    return value


def check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False; got {value!r} of type {type(value).__name__}")
    return value


def check_name(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"name must be a str or None; got {value!r} of type {type(value).__name__}")
    return value
