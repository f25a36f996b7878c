"""Build and load the native engine from ``csrc/``, once per torch version, ABI and source.

The extension is compiled against the torch in the running interpreter with
``torch.utils.cpp_extension`` (no isolated build environment that could pull
another torch) into ``<cache>/<tag>/``, where the tag names the torch version,
its C++ ABI, the Python version and a hash of the sources and flags. Later
processes import the built library directly; only a missing or stale build
compiles (about 20 s on two cores). ``python -m poolscope build`` does it ahead
of time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from ._config import ENV
from ._torch_compat import cxx11_abi

__all__ = ["BuildError", "build_dir", "load"]

_SOURCES = ("pool.cpp", "allocator.cpp", "torch_compat.cpp", "bindings.cpp")
_HEADERS = ("engine.h", "torch_compat.h")
_CFLAGS = ("-O2",)
_NAME = "poolscope_native"
_STAMP = "built.ok"

_log = logging.getLogger("poolscope")
_lock = threading.Lock()
_module: Optional[ModuleType] = None


class BuildError(RuntimeError):
    """The native engine could not be compiled or loaded here."""


def _csrc() -> Path:
    return Path(__file__).with_name("csrc")


def _tag() -> str:
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        digest.update(name.encode())
        digest.update((_csrc() / name).read_bytes())
    digest.update(" ".join(_CFLAGS).encode())
    abi = int(cxx11_abi())
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch.__version__}-abi{abi}-{py}-{digest.hexdigest()[:12]}"


def cache_root() -> Path:
    if ENV.cache_dir:
        return Path(ENV.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "poolscope"


def build_dir() -> Path:
    """Where this interpreter's torch gets its build of the native engine."""
    return cache_root() / _tag()


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(where: Path, verbose: bool) -> ModuleType:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed; install it (`pip install ninja` or your system's package)")
    where.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    module = cpp_extension.load(
        _NAME,
        [str(_csrc() / name) for name in _SOURCES],
        extra_cflags=list(_CFLAGS),
        build_directory=str(where),
        verbose=verbose,
    )
    (where / _STAMP).write_text(f"{time.perf_counter() - started:.1f} s\n")
    return module


def load(*, verbose: bool = False) -> ModuleType:
    """The native engine's extension module, built first if this torch has no build yet.

    Raises:
        BuildError: naming the cause (no compiler, no ninja, a compile error) and the fix.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        where = build_dir()
        library = where / f"{_NAME}.so"
        try:
            if (where / _STAMP).exists() and library.exists():
                _module = _import(library)
            else:
                _log.warning(
                    "poolscope: compiling the native engine for torch %s into %s (once per torch version, "
                    "about 20 s); `python -m poolscope build` does this ahead of time",
                    torch.__version__,
                    where,
                )
                _module = _compile(where, verbose)
        except BuildError:
            raise
        except Exception as exc:  # compiler missing or failing, unwritable cache, bad library
            raise BuildError(
                f"{type(exc).__name__}: {str(exc).strip()[-2000:]}\n"
                "The native engine needs a C++ compiler (g++ or clang++) and ninja; install them "
                "(e.g. `apt install g++ ninja-build`), or set POOLSCOPE_CACHE_DIR to a writable folder"
            ) from exc
        return _module
