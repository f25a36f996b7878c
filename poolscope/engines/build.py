"""Build and load the native engine from ``csrc/``, once per torch version, ABI and source.

The extension is compiled against the torch in the running interpreter with
``torch.utils.cpp_extension`` (no isolated build environment that could pull
another torch) into ``<cache>/<tag>/``, where the tag names the torch version,
its C++ ABI, the Python version and a hash of the sources and flags. Later
processes import the built library directly; only a missing or stale build
compiles (25-60 s on two cores). ``python -m poolscope build`` does it ahead
of time.

Whatever goes wrong here (sources missing from a broken install, an unusable
cache folder, no compiler, a failing compile, a cached library that does not
load or was built from other sources) becomes a :class:`BuildError` whose
message names the cause and the fix: the engine boundary turns it into one
warning and passthrough scopes, or an error under ``POOLSCOPE_ENGINE=native``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from .._config import ENV
from .._errors import PoolscopeError
from .._forksafe import ForkSafeLock
from .._torch_compat import cxx11_abi

__all__ = ["BuildError", "build_dir", "load"]

_SOURCES = ("os.cpp", "pressure.cpp", "owned.cpp", "pool.cpp", "retention.cpp", "releaser.cpp", "charging.cpp", "held.cpp",
            "scope_stack.cpp", "allocator.cpp", "torch_compat.cpp", "test_hooks.cpp", "bindings.cpp")
_HEADERS = ("os.h", "owned.h", "pool.h", "scope.h", "test_hooks.h", "torch_compat.h")
_CFLAGS = ("-O2",)
# Calls between the engine's own files bind inside the library, not through the PLT: the engine
# exports nothing anyone may interpose, and a free of memory it does not own is a few such calls.
_LDFLAGS = ("-Wl,-Bsymbolic-functions",)
# Extra compile and link flags, for sanitizer builds (scripts/sanitize); part of the cache key.
_EXTRA_FLAGS_ENV = "POOLSCOPE_EXTRA_CFLAGS"
_NAME = "poolscope_native"
_STAMP = "built.ok"
# Platforms the engine is built and tested on; elsewhere scopes pass through and say why.
_PLATFORMS = ("linux",)
_COMPILER_HELP = (
    "install a C++ compiler: Debian/Ubuntu `apt install g++`, Fedora/RHEL `dnf install gcc-c++`, "
    "Alpine `apk add g++`, conda `conda install -c conda-forge cxx-compiler`; or point CXX at one"
)

# What a failing compile, link, import or cache folder raises. Anything else (an exception a signal
# handler raises while the engine loads, say) is the caller's and propagates; the next scope retries.
_FAILURES = (OSError, ImportError, RuntimeError, ValueError, subprocess.CalledProcessError)

_log = logging.getLogger("poolscope")
_lock = ForkSafeLock()
_module: Optional[ModuleType] = None


class BuildError(PoolscopeError):
    """The native engine could not be compiled or loaded here; the message says why and what to do."""


def _csrc() -> Path:
    return Path(__file__).resolve().parent.parent / "csrc"


def _digest() -> str:
    """A hash of everything the library is built from: sources, flags, torch, ABI, Python."""
    digest = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        path = _csrc() / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BuildError(
                f"poolscope's C++ source {path} cannot be read ({exc.strerror or exc}): this install of poolscope "
                "is incomplete; reinstall it (`pip install --force-reinstall --no-deps poolscope`)"
            ) from exc
        digest.update(name.encode())
        digest.update(data)
    digest.update(" ".join([*_flags(), *_LDFLAGS]).encode())
    digest.update(f"{torch.__version__} {int(cxx11_abi())} {sys.version_info[:2]}".encode())
    return digest.hexdigest()[:12]


def _flags() -> list[str]:
    return [*_CFLAGS, *shlex.split(os.environ.get(_EXTRA_FLAGS_ENV, ""))]


def _tag(digest: str) -> str:
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch.__version__}-abi{int(cxx11_abi())}-{py}-{digest}"


def cache_root() -> Path:
    if ENV.cache_dir:
        return Path(ENV.cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "poolscope"


def build_dir() -> Path:
    """Where this interpreter's torch gets its build of the native engine.

    Raises:
        BuildError: when the engine's sources cannot be read (an incomplete install).
    """
    return cache_root() / _tag(_digest())


def _import(path: Path, digest: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not an importable extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built_from = getattr(module, "build_digest", None)
    if built_from != digest:
        raise ImportError(f"{path} was built from other sources or for another torch ({built_from!r}, wanted {digest!r})")
    return module


def _check_toolchain() -> None:
    if not sys.platform.startswith(_PLATFORMS):
        raise BuildError(
            f"the native engine is built and tested on Linux only, and this is {sys.platform!r}; scopes run "
            "unchanged here but pool nothing (results are PyTorch's)"
        )
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler: {compiler!r} is not on PATH; {_COMPILER_HELP}")


def _ninja_on_path() -> None:
    # The `ninja` dependency puts its binary in the environment's scripts folder, which is not on
    # PATH when a venv's python is run without activating the venv; cpp_extension looks on PATH.
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." at import of cpp_extension.

    It is logged on any machine with a CUDA toolkit and no GPU, reads like an error, and does
    not concern poolscope, whose engine is C++ for the CPU only.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension() -> ModuleType:
    quiet = _NoCudaRuntimeNote()
    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(quiet)
    return cpp_extension


def _compile(where: Path, digest: str, verbose: bool) -> ModuleType:
    _check_toolchain()  # first: elsewhere even importing cpp_extension may fail
    cpp_extension = _import_cpp_extension()

    _ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed; install it with `pip install ninja` (a dependency of poolscope)")
    try:
        where.mkdir(parents=True, exist_ok=True)
        (where / _STAMP).unlink(missing_ok=True)
    except OSError as exc:
        raise BuildError(
            f"cannot write the engine's build folder {where} ({exc.strerror or exc}); set POOLSCOPE_CACHE_DIR "
            "to a writable folder"
        ) from exc
    started = time.perf_counter()
    try:
        cpp_extension.load(
            _NAME,
            [str(_csrc() / name) for name in _SOURCES],
            extra_cflags=[*_flags(), f"-DPOOLSCOPE_BUILD_DIGEST={digest}"],
            extra_ldflags=[*_LDFLAGS, *_flags()[len(_CFLAGS):]],
            build_directory=str(where),
            verbose=verbose,
        )
        module = _import(where / f"{_NAME}.so", digest)
    except _FAILURES as exc:  # a failing compile or link, a library that does not load
        raise BuildError(
            f"compiling the native engine in {where} failed: {type(exc).__name__}: {str(exc).strip()[-2000:]}\n"
            f"It needs a working C++ compiler and ninja; {_COMPILER_HELP}"
        ) from exc
    (where / _STAMP).write_text(f"{time.perf_counter() - started:.1f} s\n")
    return module


def _load(verbose: bool, rebuild_broken: bool) -> ModuleType:
    digest = _digest()
    where = cache_root() / _tag(digest)
    library = where / f"{_NAME}.so"
    if (where / _STAMP).exists() and library.exists():
        try:
            return _import(library, digest)
        except _FAILURES as exc:  # a foreign, stale or damaged library
            if not rebuild_broken:
                raise BuildError(
                    f"the cached native engine {library} cannot be loaded ({type(exc).__name__}: {exc}); "
                    "run `python -m poolscope build`, which builds it again"
                ) from exc
            _log.warning("poolscope: the cached engine in %s cannot be loaded (%s); building it again", where, exc)
    _log.warning(
        "poolscope: compiling the native engine for torch %s into %s (once per torch version, 25-60 s); "
        "`python -m poolscope build` does this ahead of time",
        torch.__version__,
        where,
    )
    return _compile(where, digest, verbose)


def load(*, verbose: bool = False, rebuild_broken: bool = False) -> ModuleType:
    """The native engine's extension module, built first if this torch has no build yet.

    Args:
        verbose: show the compiler's output.
        rebuild_broken: build again when the cached library cannot be loaded (``python -m
            poolscope build`` does; a scope does not, since a library this process failed to
            load cannot be replaced in it).

    Raises:
        BuildError: naming the cause (sources missing, cache not writable, no compiler, no
            ninja, a compile error, a cached library that does not load) and the fix.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                _module = _load(verbose, rebuild_broken)
            except BuildError:
                raise
            except _FAILURES as exc:  # whatever else this path meets still must not escape a scope
                raise BuildError(f"the native engine could not be loaded: {type(exc).__name__}: {exc}") from exc
        return _module
