"""Validation and parsing of user-facing settings."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Optional, Union

import torch

BUILTIN_THRESHOLD = 1 << 20  # 1 MiB, the seed's rule
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
    return value


def check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False; got {value!r} of type {type(value).__name__}")
    return value


def check_name(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"name must be a str or None; got {value!r} of type {type(value).__name__}")
    return value


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a switch; use one of {_TRUE + _FALSE[:-1]}")


def _env_bytes(env: Mapping[str, str], name: str, parse: Callable[[object], Optional[int]]) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse(raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"environment variable {name}={raw!r} is invalid: {exc}") from None


def _env_cap(env: Mapping[str, str]) -> Optional[int]:
    raw = env.get("POOLSCOPE_MAX_CACHED", "")
    if raw.strip().lower() in ("none", "unlimited"):
        return None
    return _env_bytes(env, "POOLSCOPE_MAX_CACHED", parse_cap)


def load_environment(env: Mapping[str, str]) -> tuple[bool, int, Optional[int]]:
    """(disabled, default threshold, default cap of the shared pools) from ``env``.

    POOLSCOPE_DISABLE: 1/true/yes/on turns every scope into a no-op; 0/false/no/off or unset does not.
    POOLSCOPE_THRESHOLD: the default threshold, e.g. "4MiB".
    POOLSCOPE_MAX_CACHED: the default max_cached_bytes of get_pool()'s pools, or "none".
    """
    disabled = _env_flag(env, "POOLSCOPE_DISABLE")
    threshold = _env_bytes(env, "POOLSCOPE_THRESHOLD", parse_threshold)
    return disabled, BUILTIN_THRESHOLD if threshold is None else threshold, _env_cap(env)


# Read once, at import: a bad value fails there, naming the variable.
DISABLED, DEFAULT_THRESHOLD, DEFAULT_MAX_CACHED = load_environment(os.environ)
