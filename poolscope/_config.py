"""Validation and parsing of user-facing settings, and the environment variables that set defaults."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Literal, Optional, TypeVar, Union

import torch

from ._errors import PoolscopeTypeError, PoolscopeValueError

BUILTIN_THRESHOLD = 1 << 20  # 1 MiB, the rule of the hand-written pools poolscope replaces
BUILTIN_RELEASE_AFTER = 100
# Cached memory unused this long goes back by itself: well above the pauses of a loop that keeps
# its working set (2 s between steps), well below "an idle spike is back within a minute"; the
# decay jemalloc uses by default (dirty_decay_ms=10000). See docs/memory.md.
BUILTIN_RELEASE_IDLE_S = 10.0
# A clock left to learn ("auto", the default) starts at the built-in setting above and holds at
# most LEARN_LIMIT times it: 3,200 exits and 320 s (csrc/retention.cpp's kLearnLimit).
AUTO: Literal["auto"] = "auto"
LEARN_LIMIT = 32
ReleaseAfter = Union[int, Literal["auto"]]
ReleaseIdle = Union[float, None, Literal["auto"]]
CAPTURE_MODES = ("all", "factories")
ON_LIMIT = ("raise", "fallback")
ENGINES = ("native", "passthrough")

# The largest byte size or count any setting takes: what the engine's int64 fields hold.
LARGEST_INT = 2**63 - 1
# Seconds at or past this mean "never": microseconds past 2**62 would overflow the engine's clock
# arithmetic, and 146,000 years is never for any process.
LONGEST_SECONDS = 2**62 / 1e6

ByteSize = Union[int, str]
DeviceLike = Union[str, torch.device, int]
T = TypeVar("T")

# Case matters: "MB" is 10**6 and "MiB" 2**20, so "mb" would be a guess.
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_SIZE_HELP = "an int number of bytes >= 0 or a string such as '1MiB', '512KB', '2GB' (KB=1000, KiB=1024)"


def _type_error(what: str, allowed: str, value: object) -> PoolscopeTypeError:
    return PoolscopeTypeError(f"{what} must be {allowed}; got {value!r} of type {type(value).__name__}")


def parse_bytes(value: object, what: str) -> int:
    """Turn an int or a string such as ``"1.5MiB"`` into a number of bytes."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _type_error(what, _SIZE_HELP, value)
    if isinstance(value, int):
        if value < 0:
            raise PoolscopeValueError(f"{what} must be >= 0 bytes; got {value}")
        return _at_most_largest(value, what, " bytes")
    match = _SIZE_RE.match(value)
    if match is None:
        raise PoolscopeValueError(f"{what} must be {_SIZE_HELP}; got {value!r}")
    unit = match.group(2)
    if unit not in _UNITS:
        folded = {u.lower(): u for u in ("B", "KB", "MB", "GB", "TB")}
        hint = ""
        if unit.lower() in folded:
            decimal, binary = folded[unit.lower()], folded[unit.lower()].replace("B", "iB")
            hint = f" (write {match.group(1)}{decimal} for powers of 1000 or {match.group(1)}{binary} for powers of 1024)"
        raise PoolscopeValueError(f"{what} must be {_SIZE_HELP}; got {value!r}{hint}")
    number = float(match.group(1)) * _UNITS[unit]
    if not number < LARGEST_INT:
        raise PoolscopeValueError(f"{what} must be at most {LARGEST_INT} bytes (2**63 - 1, 8 EiB); got {value!r}")
    return math.ceil(number)


def _at_most_largest(value: int, what: str, unit: str = "") -> int:
    if value > LARGEST_INT:
        raise PoolscopeValueError(f"{what} must be at most {LARGEST_INT}{unit} (2**63 - 1); got {value}")
    return value


def parse_threshold(value: object) -> int:
    return parse_bytes(value, "threshold")


def parse_limit(value: object, what: str) -> Optional[int]:
    """A byte limit, or None for no limit."""
    return None if value is None else parse_bytes(value, what)


def parse_seconds(value: object, what: str) -> Optional[float]:
    """A duration in seconds > 0, or None for "never".

    0, None, ``math.inf`` and anything at or past :data:`LONGEST_SECONDS` (146,000 years) mean
    never; NaN and negative numbers are errors.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(what, "a number of seconds >= 0, or None (0, None and math.inf mean never)", value)
    if value != value:  # NaN: not ordered, so it would pass every comparison below as False
        raise PoolscopeValueError(f"{what} must be a number of seconds >= 0 (0, None and math.inf mean never); got nan")
    if value < 0:
        raise PoolscopeValueError(f"{what} must be >= 0 seconds (0, None and math.inf mean never); got {value}")
    if value == 0 or value >= LONGEST_SECONDS:  # compared as numbers: an int past float's range is never too
        return None
    return float(value)


def _parse_seconds_env(raw: str) -> ReleaseIdle:
    if raw.lower() == AUTO:
        return AUTO
    if raw.lower() in ("none", "off", "never"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise PoolscopeValueError(f"release_idle_s must be a number of seconds, 0, 'none' or 'auto'; got {raw!r}") from None
    return parse_seconds(value, "release_idle_s")


def parse_release_after(value: object) -> tuple[int, bool]:
    """``release_after`` as (setting, learns): "auto" learns from the built-in 100 exits."""
    if isinstance(value, str):
        if value == AUTO:
            return BUILTIN_RELEASE_AFTER, True
        raise PoolscopeValueError(f"release_after must be an int >= 0 or 'auto'; got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error("release_after", "an int >= 0 or 'auto'", value)
    return parse_count(value, "release_after"), False


def parse_release_idle(value: object) -> tuple[Optional[float], bool]:
    """``release_idle_s`` as (setting, learns): "auto" learns from the built-in 10 s."""
    if isinstance(value, str):
        if value == AUTO:
            return BUILTIN_RELEASE_IDLE_S, True
        raise PoolscopeValueError(f"release_idle_s must be a number of seconds, None or 'auto'; got {value!r}")
    return parse_seconds(value, "release_idle_s"), False


def parse_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(what, "an int >= 0", value)
    if value < 0:
        raise PoolscopeValueError(f"{what} must be an int >= 0; got {value}")
    return _at_most_largest(value, what)


def parse_device(value: object, what: str = "device") -> torch.device:
    """Normalise a device argument; ``cuda`` without an index means the current one, ``cpu:0`` is ``cpu``."""
    if isinstance(value, bool) or not isinstance(value, (str, torch.device, int)):
        raise _type_error(what, "a str, torch.device or int such as 'cpu' or 'cuda:0'", value)
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise PoolscopeValueError(f"{what} {value!r} is not a device: {exc}") from None
    if device.type == "cpu":
        # The process has one CPU device, whatever index names it.
        return torch.device("cpu")
    if device.type == "meta":
        raise PoolscopeValueError(
            f"{what} {value!r} has no memory to pool; use 'cpu' or an accelerator such as 'cuda'"
        )
    module = getattr(torch, device.type, None)
    is_available = getattr(module, "is_available", None)
    if is_available is None or not is_available():
        # Portable code names the device it runs on elsewhere (a forward decorated for CUDA,
        # imported on a CPU-only test machine): such a scope routes nothing and changes nothing,
        # as on any device without a route. Tensors on that device would fail by themselves.
        return device if device.index is not None else torch.device(device.type, 0)
    if device.index is None:
        device = torch.device(device.type, module.current_device())
    return device


def parse_choice(value: object, what: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _type_error(what, f"one of {allowed}", value)
    if value not in allowed:
        raise PoolscopeValueError(f"{what} must be one of {allowed}; got {value!r}")
    return value


def check_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(what, "True or False", value)
    return value


def check_name(value: object) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise _type_error("name", "a str or None", value)
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
    raise PoolscopeValueError(f"environment variable {name}={raw!r} is not a switch; use one of {_TRUE + _FALSE[:-1]}")


def _env_value(env: Mapping[str, str], name: str, parse: Callable[[str], T]) -> Optional[T]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return parse(raw.strip())
    except (TypeError, ValueError) as exc:
        raise PoolscopeValueError(f"environment variable {name}={raw!r} is invalid: {exc}") from None


def _parse_seconds_env_named(raw: str) -> ReleaseIdle:
    try:
        return _parse_seconds_env(raw.strip())
    except (TypeError, ValueError) as exc:
        raise PoolscopeValueError(f"environment variable POOLSCOPE_RELEASE_IDLE_S={raw!r} is invalid: {exc}") from None


def _parse_release_after_env(raw: str) -> ReleaseAfter:
    return AUTO if raw.lower() == AUTO else parse_count(int(raw), "release_after")


def _parse_cap(raw: str) -> Optional[int]:
    return None if raw.lower() in ("none", "unlimited") else parse_bytes(raw, "max_cached_bytes")


class Environment:
    """Defaults read from the environment (see :func:`load_environment`)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.disabled = _env_flag(env, "POOLSCOPE_DISABLE")
        threshold = _env_value(env, "POOLSCOPE_THRESHOLD", parse_threshold)
        self.threshold = BUILTIN_THRESHOLD if threshold is None else threshold
        self.max_cached = _env_value(env, "POOLSCOPE_MAX_CACHED", _parse_cap)
        release_after = _env_value(env, "POOLSCOPE_RELEASE_AFTER", _parse_release_after_env)
        self.release_after: ReleaseAfter = AUTO if release_after is None else release_after
        unset = "POOLSCOPE_RELEASE_IDLE_S" not in env or not env["POOLSCOPE_RELEASE_IDLE_S"].strip()
        self.release_idle_s: ReleaseIdle = AUTO
        if not unset:
            self.release_idle_s = _parse_seconds_env_named(env["POOLSCOPE_RELEASE_IDLE_S"])
        self.engine = _env_value(env, "POOLSCOPE_ENGINE", _parse_engine)
        self.cache_dir = env.get("POOLSCOPE_CACHE_DIR") or None


def _parse_engine(raw: str) -> str:
    if raw == "dispatch":
        raise PoolscopeValueError(
            "the dispatch-mode engine was removed in poolscope 0.2: any TorchDispatchMode on the stack makes some "
            "ATen ops compute different bits (see docs/engines.md); use 'native' or 'passthrough'"
        )
    return parse_choice(raw, "POOLSCOPE_ENGINE", ENGINES)


def load_environment(env: Mapping[str, str]) -> Environment:
    """The defaults that environment variables set.

    POOLSCOPE_DISABLE: 1/true/yes/on makes every scope pass-through (as POOLSCOPE_ENGINE=passthrough).
    POOLSCOPE_THRESHOLD: the default threshold, e.g. "4MiB".
    POOLSCOPE_MAX_CACHED: the default max_cached_bytes of get_pool()'s pools, or "none".
    POOLSCOPE_RELEASE_AFTER: outermost-scope exits without a reuse after which cached memory is released,
        or "auto" (the default: learned from the traffic, from 100 up to 3,200).
    POOLSCOPE_RELEASE_IDLE_S: seconds after which unused cached memory goes back by itself, or "auto"
        (the default: learned from the traffic, from 10 up to 320); 0 or "none" turns it off.
    POOLSCOPE_ENGINE: "native" (fail loudly if it cannot be built) or "passthrough"; unset picks native
        and falls back to passthrough with one warning.
    POOLSCOPE_CACHE_DIR: where the native engine is built (default ~/.cache/poolscope).
    """
    return Environment(env)


# Read once, at import: a bad value fails there, naming the variable.
ENV = load_environment(os.environ)
DEFAULT_THRESHOLD = ENV.threshold
