"""``pooled_forward``: run a function or a module's forward inside a fresh pool scope per call."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar, overload

import torch
import wrapt

from ._config import DEFAULT_THRESHOLD, ByteSize, DeviceLike
from ._errors import PoolscopeTypeError, PoolscopeValueError
from ._pool import TensorPool
from ._options import scope_options
from ._scope import PoolScope
from .engines.base import ScopeOptions

__all__ = ["pooled_forward", "unpool"]

F = TypeVar("F", bound=Callable[..., Any])


@overload
def pooled_forward(wrapped: F) -> F: ...


@overload
def pooled_forward(
    wrapped: None = None,
    *,
    device: Optional[DeviceLike] = ...,
    threshold: ByteSize = ...,
    capture: str = ...,
    pool: Optional[TensorPool] = ...,
    max_bytes: Optional[ByteSize] = ...,
    on_limit: str = ...,
    strict: bool = ...,
    name: Optional[str] = ...,
    enable_profiling: bool = ...,
) -> Callable[[F], F]: ...


def pooled_forward(
    wrapped: Any = None,
    *,
    device: Optional[DeviceLike] = None,
    threshold: ByteSize = DEFAULT_THRESHOLD,
    capture: str = "all",
    pool: Optional[TensorPool] = None,
    max_bytes: Optional[ByteSize] = None,
    on_limit: str = "raise",
    strict: bool = False,
    name: Optional[str] = None,
    enable_profiling: bool = False,
) -> Any:
    """Decorate a forward (or any function) so that each call runs in its own :func:`pool_scope`.

    Works bare or with :func:`pool_scope`'s keyword arguments, on functions,
    methods, ``nn.Module.forward`` at class level, staticmethods and
    classmethods; keeps ``__name__``, ``__doc__`` and the signature. An
    instance whose ``enable_memory_pool`` attribute is ``False`` (the per-module
    switch of the hand-written pools) runs the forward without a scope.

    Example::

        class Attention(nn.Module):
            @poolscope.pooled_forward
            def forward(self, q, k, v): ...

        @poolscope.pooled_forward(threshold="4MiB")
        def generate(model, tokens): ...

    Args:
        wrapped: the function; leave it out to pass keyword arguments.
        device, threshold, capture, pool, max_bytes, on_limit, strict, enable_profiling: as for
            :func:`pool_scope`.
        name: the row in :func:`report`; defaults to the function's qualified name.

    Returns:
        The wrapped function, or a decorator when called with keywords only.

    Given an ``nn.Module`` *instance* (a model you did not write), it wraps
    that instance's forward in place and returns the module; :func:`unpool`
    undoes it. Other instances of the class are untouched.

    Raises:
        PoolscopeTypeError: when given a class (decorate its ``forward`` instead) or
            something that is not callable; PoolscopeTypeError/PoolscopeValueError for bad settings.
        PoolscopeValueError: when the module instance is already pooled.

    Limits:
        While ``torch.compile`` traces a decorated forward, the decorator steps aside
        (no graph break) and the compiled forward runs unpooled; to pool compiled code,
        put the scope around the call instead: ``with pool_scope(): compiled(x)``.
    """
    keywords: dict[str, Any] = dict(
        device=device, threshold=threshold, capture=capture, pool=pool, max_bytes=max_bytes, on_limit=on_limit,
        strict=strict, enable_profiling=enable_profiling,
    )
    if wrapped is None:
        scope_options(**keywords, name=name)  # fail here, at decoration, on a bad setting
        return functools.partial(pooled_forward, **keywords, name=name)
    if isinstance(wrapped, type):
        raise PoolscopeTypeError(
            f"pooled_forward decorates a function or method, not the class {wrapped.__qualname__}; "
            "decorate its forward instead: `@poolscope.pooled_forward` above `def forward(self, ...)`"
        )
    if isinstance(wrapped, torch.nn.Module):
        module_name = f"{type(wrapped).__qualname__}.forward"
        return _pool_instance(wrapped, scope_options(**keywords, name=module_name if name is None else name))
    if not (callable(wrapped) or isinstance(wrapped, (staticmethod, classmethod))):
        raise PoolscopeTypeError(
            f"pooled_forward needs a function or method; got {wrapped!r} of type {type(wrapped).__name__}"
        )
    qualname = getattr(getattr(wrapped, "__func__", wrapped), "__qualname__", None)
    return _in_scope(scope_options(**keywords, name=qualname if name is None else name))(wrapped)


def _in_scope(options: ScopeOptions) -> Any:
    is_compiling = torch.compiler.is_compiling

    @wrapt.decorator
    def run_in_scope(wrapped: Callable[..., Any], instance: Any, args: tuple, kwargs: dict) -> Any:
        # While torch.compile traces, run straight through: Dynamo then inlines the
        # forward without graph breaks; the compiled code runs unpooled.
        if is_compiling() or (instance is not None and getattr(instance, "enable_memory_pool", True) is False):
            return wrapped(*args, **kwargs)
        with PoolScope(options):
            return wrapped(*args, **kwargs)

    return run_in_scope


_SAVED = "_poolscope_unpooled_forward"
_NOTHING = object()


def _pool_instance(module: torch.nn.Module, options: ScopeOptions) -> torch.nn.Module:
    if _SAVED in module.__dict__:
        raise PoolscopeValueError(
            f"this {type(module).__name__} is already pooled; call poolscope.unpool(module) first to change settings"
        )
    # An instance attribute shadows the class's forward for this module only.
    module.__dict__[_SAVED] = module.__dict__.get("forward", _NOTHING)
    module.__dict__["forward"] = _in_scope(options)(module.forward)
    return module


def unpool(module: torch.nn.Module) -> torch.nn.Module:
    """Undo ``pooled_forward(module)``: the instance's forward runs unpooled again.

    Example::

        model = poolscope.pooled_forward(pretrained_model)   # pool a model you did not write
        ...
        poolscope.unpool(model)

    Returns:
        The same module.

    Raises:
        PoolscopeTypeError: when ``module`` is not an ``nn.Module``.
        PoolscopeValueError: when it was not pooled with ``pooled_forward(module)``.
    """
    if not isinstance(module, torch.nn.Module):
        raise PoolscopeTypeError(f"unpool takes an nn.Module; got {module!r} of type {type(module).__name__}")
    if _SAVED not in module.__dict__:
        raise PoolscopeValueError(f"this {type(module).__name__} was not pooled with poolscope.pooled_forward(module)")
    saved = module.__dict__.pop(_SAVED)
    if saved is _NOTHING:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = saved
    return module
