"""Which ATen factory ops a scope captures, the memory each needs, and how to fill it.

Under a TorchDispatchMode each factory call arrives as one ATen op with
autograd already stripped (``requires_grad`` is applied above the mode). For
each captured op this module works out the exact output layout the op would
produce (size, strides, dtype, device, storage bytes) and then fills a pooled
tensor of that layout the way the op's own kernel fills its fresh tensor
(``zeros`` is ``empty`` + ``zero_``, ``randn`` is ``empty`` + ``normal_`` and
so on), so values and RNG streams are bit-identical.

Layouts that need PyTorch's own rules (``*_like`` of non-contiguous inputs,
``arange``) are computed once on the meta device and cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from ._pool import contiguous_strides
from ._torch_compat import no_python_dispatch

__all__ = ["CAPTURED", "Request", "plan"]

aten = torch.ops.aten

Fill = Optional[Callable[[torch.Tensor, tuple, dict], Any]]


class Request(NamedTuple):
    device: torch.device
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass(frozen=True)
class Factory:
    kind: str  # "sized", "like", "new", "eye", "linspace", "arange"
    fill: Fill
    size_arg: int = 0
    stride_arg: Optional[int] = None
    default_dtype: Optional[torch.dtype] = None  # None: torch.get_default_dtype()
    dtype_from_arg: Optional[int] = None  # full: dtype inferred from this scalar


def _zero(t: torch.Tensor, a: tuple, k: dict) -> Any:
    return t.zero_()


def _one(t: torch.Tensor, a: tuple, k: dict) -> Any:
    return t.fill_(1)


def _fill_with(i: int) -> Fill:
    return lambda t, a, k: t.fill_(a[i])


def _uniform(t: torch.Tensor, a: tuple, k: dict) -> Any:
    return t.uniform_(0, 1, generator=k.get("generator"))


def _normal(t: torch.Tensor, a: tuple, k: dict) -> Any:
    return t.normal_(0, 1, generator=k.get("generator"))


def _random_below(i: int) -> Fill:
    return lambda t, a, k: t.random_(0, a[i], generator=k.get("generator"))


def _random_between(i: int) -> Fill:
    return lambda t, a, k: t.random_(a[i], a[i + 1], generator=k.get("generator"))


def _into(out_op: Any) -> Fill:
    return lambda t, a, k: out_op(*a, out=t)


def _arange_into(t: torch.Tensor, a: tuple, k: dict) -> Any:
    if len(a) == 1:
        return aten.arange.out(a[0], out=t)
    return aten.arange.start_out(*a, out=t)


def _sized(fill: Fill, **kw: Any) -> Factory:
    return Factory("sized", fill, **kw)


def _like(fill: Fill) -> Factory:
    return Factory("like", fill)


def _new(fill: Fill, **kw: Any) -> Factory:
    return Factory("new", fill, size_arg=1, **kw)


_long = torch.int64
CAPTURED: dict[Any, Factory] = {
    aten.empty.memory_format: _sized(None),
    aten.empty_strided.default: _sized(None, stride_arg=1),
    aten.zeros.default: _sized(_zero),
    aten.ones.default: _sized(_one),
    aten.full.default: _sized(_fill_with(1), dtype_from_arg=1),
    aten.rand.default: _sized(_uniform),
    aten.rand.generator: _sized(_uniform),
    aten.randn.default: _sized(_normal),
    aten.randn.generator: _sized(_normal),
    aten.randint.default: _sized(_random_below(0), size_arg=1, default_dtype=_long),
    aten.randint.generator: _sized(_random_below(0), size_arg=1, default_dtype=_long),
    aten.randint.low: _sized(_random_between(0), size_arg=2, default_dtype=_long),
    aten.randint.low_generator: _sized(_random_between(0), size_arg=2, default_dtype=_long),
    aten.empty_like.default: _like(None),
    aten.zeros_like.default: _like(_zero),
    aten.ones_like.default: _like(_one),
    aten.full_like.default: _like(_fill_with(1)),
    aten.rand_like.default: _like(_uniform),
    aten.rand_like.generator: _like(_uniform),
    aten.randn_like.default: _like(_normal),
    aten.randn_like.generator: _like(_normal),
    aten.randint_like.default: _like(_random_below(1)),
    aten.randint_like.generator: _like(_random_below(1)),
    aten.randint_like.low_dtype: _like(_random_between(1)),
    aten.randint_like.low_generator_dtype: _like(_random_between(1)),
    aten.new_empty.default: _new(None),
    aten.new_empty_strided.default: _new(None, stride_arg=2),
    aten.new_zeros.default: _new(_zero),
    aten.new_ones.default: _new(_one),
    aten.new_full.default: _new(_fill_with(2)),
    aten.eye.default: Factory("eye", _into(aten.eye.out)),
    aten.eye.m: Factory("eye", _into(aten.eye.m_out)),
    aten.linspace.default: Factory("linspace", _into(aten.linspace.out)),
    aten.arange.default: Factory("arange", _arange_into, default_dtype=_long),
    aten.arange.start: Factory("arange", _arange_into, default_dtype=_long),
    aten.arange.start_step: Factory("arange", _arange_into, default_dtype=_long),
}


def _dims(value: object) -> Optional[tuple[int, ...]]:
    """A tuple of plain non-negative ints, or None (negative sizes fail natively)."""
    if not isinstance(value, (list, tuple)):
        return None
    for d in value:
        if type(d) is not int or d < 0:
            return None
    return tuple(value)


def _storage_bytes(size: Sequence[int], stride: Sequence[int], itemsize: int) -> int:
    if 0 in size:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(size, stride))) * itemsize


def _resolve_device(device: Optional[torch.device], default: torch.device) -> torch.device:
    if device is None:
        return default
    if type(device) is torch.device and (device.index is not None or device.type == "cpu"):
        return device
    device = torch.device(device)
    if device.index is None and device.type != "cpu":
        module = getattr(torch, device.type)
        device = torch.device(device.type, module.current_device())
    return device


_CPU = torch.device("cpu")


@functools.lru_cache(maxsize=1024)
def _meta_stride_like(size: torch.Size, stride: tuple, dtype: torch.dtype, memory_format: Any) -> tuple:
    with no_python_dispatch():
        meta = torch.empty_strided(size, stride, dtype=dtype, device="meta")
        return torch.empty_like(meta, memory_format=memory_format or torch.preserve_format).stride()


@functools.lru_cache(maxsize=1024)
def _meta_stride_sized(size: tuple, memory_format: Any) -> tuple:
    with no_python_dispatch():
        return torch.empty(size, memory_format=memory_format, device="meta").stride()


@functools.lru_cache(maxsize=1024)
def _meta_dtype_of_scalar(kind: str, default: torch.dtype, value: Any) -> torch.dtype:
    with no_python_dispatch():
        return torch.full((), value, device="meta").dtype


@functools.lru_cache(maxsize=1024)
def _meta_arange(args: tuple, dtype: Optional[torch.dtype]) -> tuple[tuple[int, ...], torch.dtype]:
    with no_python_dispatch():
        meta = torch.arange(*args, dtype=dtype, device="meta")
    return tuple(meta.shape), meta.dtype


def _plain_tensor(value: object) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and type(value).__torch_dispatch__ is torch.Tensor.__torch_dispatch__
        and value.layout is torch.strided
        and not value.is_meta
    )


def plan(spec: Factory, args: tuple, kwargs: dict, threshold: int) -> Optional[Request]:
    """The layout ``spec``'s op would give its output, or None to leave the call alone.

    None also when the output would need fewer than ``threshold`` bytes.
    """
    if kwargs.get("layout") not in (None, torch.strided) or kwargs.get("pin_memory"):
        return None
    kind = spec.kind
    if kind == "like":
        return _plan_like(args[0], kwargs, threshold)
    dtype = kwargs.get("dtype")
    if kind == "new":
        src = args[0]
        if not _plain_tensor(src):
            return None
        device = _resolve_device(kwargs.get("device"), src.device)
        dtype = dtype or src.dtype
    else:
        device = _resolve_device(kwargs.get("device"), _CPU)
    if kind == "arange":
        return _plan_arange(args, dtype, device, threshold)
    if kind == "eye":
        size = _dims((args[0], args[1] if len(args) > 1 else args[0]))
    elif kind == "linspace":
        if dtype is None and any(isinstance(a, complex) for a in args[:2]):
            return None
        size = _dims((args[2],))
    else:
        size = _dims(args[spec.size_arg])
    if size is None:
        return None
    if dtype is None:
        dtype = _inferred_dtype(spec, args)
    memory_format = kwargs.get("memory_format")
    stride: Optional[tuple[int, ...]]
    if spec.stride_arg is not None:
        stride = _dims(args[spec.stride_arg])
        if stride is None or len(stride) != len(size):
            return None
    elif memory_format is None or memory_format is torch.contiguous_format:
        stride = contiguous_strides(size)
    elif memory_format is torch.preserve_format:
        return None  # an error for these ops: let PyTorch raise it
    else:
        stride = None
    return _sized_request(device, size, stride, dtype, threshold, memory_format)


def _inferred_dtype(spec: Factory, args: tuple) -> torch.dtype:
    default = torch.get_default_dtype()
    if spec.dtype_from_arg is None:
        return spec.default_dtype or default
    value = args[spec.dtype_from_arg]  # full(): the fill value decides, as in PyTorch
    if type(value) is bool:
        return torch.bool
    if type(value) is int:
        return torch.int64
    if type(value) is float:
        return default
    return _meta_dtype_of_scalar(type(value).__name__, default, value)


def _plan_like(src: object, kwargs: dict, threshold: int) -> Optional[Request]:
    if not isinstance(src, torch.Tensor) or not _plain_tensor(src):
        return None
    device = _resolve_device(kwargs.get("device"), src.device)
    dtype = kwargs.get("dtype") or src.dtype
    size = tuple(src.shape)
    nbytes = math.prod(size) * dtype.itemsize  # *_like outputs are always dense
    if nbytes < threshold:
        return None
    memory_format = kwargs.get("memory_format")
    if (memory_format is None or memory_format is torch.preserve_format) and src.is_contiguous():
        stride = tuple(src.stride())  # empty_like keeps a dense input's strides, size-1 dims too
    elif memory_format is torch.contiguous_format:
        stride = contiguous_strides(size)
    else:
        stride = _meta_stride_like(src.shape, tuple(src.stride()), dtype, memory_format)
    return Request(device, size, stride, dtype, nbytes)


def _plan_arange(
    args: tuple, dtype: Optional[torch.dtype], device: torch.device, threshold: int
) -> Optional[Request]:
    try:
        start, end, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
        count = math.ceil(abs((float(end) - float(start)) / float(step)))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        return None
    # An upper bound first, so that small aranges leave before the meta call.
    if count * (dtype or torch.complex128).itemsize < threshold:
        return None
    if not all(type(a) in (int, float, bool) for a in args):
        return None
    size, dtype = _meta_arange(tuple(args), dtype)
    return _sized_request(device, size, contiguous_strides(size), dtype, threshold)


def _sized_request(
    device: torch.device,
    size: tuple[int, ...],
    stride: Optional[tuple[int, ...]],
    dtype: torch.dtype,
    threshold: int,
    memory_format: Any = None,
) -> Optional[Request]:
    if stride is None:
        nbytes = math.prod(size) * dtype.itemsize
        if nbytes < threshold:
            return None
        stride = _meta_stride_sized(size, memory_format)
    else:
        nbytes = _storage_bytes(size, stride, dtype.itemsize)
        if nbytes < threshold:
            return None
    return Request(device, size, tuple(stride), dtype, nbytes)
