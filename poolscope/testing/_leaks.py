"""``assert_no_leaks``: fail when pooled memory lent inside a block outlives it."""

from __future__ import annotations

import contextlib
import gc
import os
import types
from typing import Any, Optional

import torch

from .._config import DEFAULT_THRESHOLD, ByteSize, DeviceLike, parse_count
from .._diagnostics import describe_block
from .._options import scope_options
from .._scope import PoolScope

__all__ = ["assert_no_leaks"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # poolscope's own frames


def _holders(blocks: list[dict[str, Any]]) -> dict[int, torch.Tensor]:
    """A live tensor over each block (by block address), found among the garbage collector's objects."""
    spans = sorted((b["address"], b["address"] + b["size"]) for b in blocks if b["address"] is not None)
    found: dict[int, torch.Tensor] = {}
    for obj in gc.get_objects():
        if type(obj) is not torch.Tensor and type(obj) is not torch.nn.Parameter:
            continue
        try:
            ptr = obj.untyped_storage().data_ptr()
        except RuntimeError:  # meta, sparse or otherwise storage-less tensors
            continue
        for start, end in spans:
            if start <= ptr < end and start not in found:
                found[start] = obj
    return found


def _name_of(obj: object, skip: set[int]) -> Optional[str]:
    """``Type.attribute`` or ``module.name`` when an object's or a module's ``__dict__`` holds ``obj``."""
    for ref in gc.get_referrers(obj):
        if id(ref) in skip:
            continue
        if isinstance(ref, dict):
            key = _key_of(ref, obj)
            if key is None:
                continue
            for holder in gc.get_referrers(ref):
                if isinstance(holder, types.ModuleType) and holder.__dict__ is ref:
                    return f"the module global {holder.__name__}.{key}"
                if getattr(holder, "__dict__", None) is ref:
                    return f"{type(holder).__qualname__}.{key}"
        elif not isinstance(ref, (type, types.FrameType)):
            # Python 3.13 keeps instance attributes inline: the instance, not a dict, refers to obj.
            attributes = getattr(ref, "__dict__", None)
            key = _key_of(attributes, obj) if isinstance(attributes, dict) else None
            if key is not None:
                return f"{type(ref).__qualname__}.{key}"
    return None


def _key_of(mapping: dict[Any, Any], obj: object) -> Optional[str]:
    return next((str(k) for k, v in mapping.items() if v is obj), None)


def _kept_by(tensor: torch.Tensor, skip: set[int]) -> Optional[str]:
    """What keeps ``tensor`` alive, in the user's words: an attribute or global, an item of one, a local."""
    direct = _name_of(tensor, skip)
    if direct is not None:
        return direct
    for ref in gc.get_referrers(tensor):
        if id(ref) in skip:
            continue
        if isinstance(ref, types.FrameType) and not ref.f_code.co_filename.startswith(_PACKAGE_DIR):
            return f"a local variable of {ref.f_code.co_name} ({ref.f_code.co_filename}:{ref.f_lineno})"
        if isinstance(ref, (list, tuple, set, dict)):
            owner = _name_of(ref, skip | {id(ref)})
            if owner is not None:
                return f"an item of {owner} (a {type(ref).__name__})"
    return None


def _describe(block: dict[str, Any], holder: Optional[torch.Tensor], skip: set[int]) -> str:
    text = describe_block(block)
    if holder is not None:
        text += f"; held by a tensor of shape {tuple(holder.shape)}, dtype {holder.dtype}"
        kept = _kept_by(holder, skip)
        if kept is not None:
            text += f", kept by {kept}"
    return f"  - {text}"


class assert_no_leaks(contextlib.ContextDecorator):  # noqa: N801 - used like a function
    """Run the body in a pool scope and fail if memory it pooled is still alive afterwards.

    At exit, after a garbage collection, every block lent inside the body
    (nested scopes and decorated forwards included) must be back, apart from
    ``allow_escapes`` of them (outputs you deliberately keep).

    Example::

        from poolscope.testing import assert_no_leaks

        def test_attention_does_not_leak():
            module = Attention()
            with assert_no_leaks(enable_profiling=True):
                module(q, k, v)                      # output dropped: nothing may stay

        @assert_no_leaks(allow_escapes=1)            # also a decorator
        def test_forward_returns_one_tensor(): ...

    Args:
        device: as for :func:`poolscope.pool_scope`.
        allow_escapes: how many pooled blocks may outlive the body.
        threshold: as for :func:`poolscope.pool_scope`.
        enable_profiling: record where each block was allocated, so that the
            failure message names the file and line.

    Raises:
        AssertionError: listing each leaked block (size, the tensor holding it, and the
            allocating line when profiling) when more than ``allow_escapes`` remain.
        PoolscopeTypeError, PoolscopeValueError: for bad arguments.
    """

    def __init__(
        self,
        device: Optional[DeviceLike] = None,
        *,
        allow_escapes: int = 0,
        threshold: ByteSize = DEFAULT_THRESHOLD,
        enable_profiling: bool = False,
    ) -> None:
        self._allow = parse_count(allow_escapes, "allow_escapes")
        self._options = scope_options(device=device, threshold=threshold, enable_profiling=enable_profiling)
        self._scope = PoolScope(self._options)

    def _recreate_cm(self) -> assert_no_leaks:
        clone = assert_no_leaks.__new__(assert_no_leaks)
        clone._allow, clone._options, clone._scope = self._allow, self._options, PoolScope(self._options)
        return clone

    @property
    def scope(self) -> PoolScope:
        """The scope the body runs in; its ``stats`` are final after exit."""
        return self._scope

    def __enter__(self) -> assert_no_leaks:
        self._scope.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        __tracebackhide__ = True  # pytest: show the test, not this frame
        scope = self._scope
        gc.collect()  # garbage cycles are not leaks
        scope.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        leaks = scope.live_blocks()
        if len(leaks) > self._allow:
            holders = _holders(leaks)
            skip = {id(holders)}
            lines = "\n".join(_describe(b, holders.get(b["address"]), skip) for b in leaks)
            # The error's traceback keeps this frame: it must not keep the leaked tensors too, or a
            # test that expects this error would leak them past its end (--poolscope-leak-check).
            del holders
            raise AssertionError(
                f"assert_no_leaks: {len(leaks)} pooled block(s) still alive after the body "
                f"(allowed: {self._allow}):\n{lines}\n"
                "Something kept a tensor created inside the body (a cache, a global list, a hook, "
                "self.<attribute>); drop it, or raise allow_escapes for outputs you keep."
            )
