"""capture="all": serve the outputs of ATen ops from the pool through their ``out=`` overloads.

For an op ``f`` with exactly one fresh tensor output and an ``out=`` overload
that takes the same arguments and has a real kernel for the device (not the
generated "compute, then copy into out" wrapper), the scope computes the
output layout ``f`` would produce, lends a pooled tensor of that layout, and
runs ``f.out(..., out=pooled)``. The layout comes from running ``f`` on meta
tensors once per (op, input sizes/strides/dtypes, other arguments) and is
cached, so a repeated forward pays a dictionary lookup. Views, in-place ops,
ops returning several tensors or aliases, and ops with data-dependent output
shapes are left alone.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch

from ._torch_compat import has_backend_kernel, no_python_dispatch

__all__ = ["OutputPlan", "Layout", "output_layout", "output_plan"]

# An op whose inputs are all this many times smaller than the threshold is
# taken to make a small output: outer products and repeats that grow more are rare.
GROWTH_BOUND = 64
LAYOUT_CACHE_LIMIT = 16384

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_SCALARS = (int, float, bool, complex, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


class OutputPlan(NamedTuple):
    out_op: Any
    out_name: str


class Layout(NamedTuple):
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


# Ops whose result shares its input's storage although the schema declares a fresh tensor.
_ALIASING_DESPITE_SCHEMA = frozenset({torch.ops.aten._unsafe_view})
_PLANS: dict[Any, Optional[OutputPlan]] = {}
_LAYOUTS: dict[tuple, Optional[Layout]] = {}
_NO_PLAN_TAGS = frozenset(
    tag
    for name in ("dynamic_output_shape", "data_dependent_output", "inplace_view", "view_copy")
    if (tag := getattr(torch.Tag, name, None)) is not None
)


def output_plan(func: Any) -> Optional[OutputPlan]:
    """The ``out=`` overload to serve ``func``'s output through, or None (cached per op)."""
    try:
        return _PLANS[func]
    except KeyError:
        plan = _PLANS[func] = _find_plan(func)
        return plan


def _signature(schema: Any) -> list[tuple[str, str]]:
    return [(a.name, str(a.type)) for a in schema.arguments if not a.is_out]


def _find_plan(func: Any) -> Optional[OutputPlan]:
    schema = getattr(func, "_schema", None)
    if schema is None or schema.is_mutable or len(schema.returns) != 1:
        return None
    ret = schema.returns[0]
    if ret.alias_info is not None or str(ret.type) != "Tensor":
        return None
    if any(a.alias_info is not None for a in schema.arguments) or _NO_PLAN_TAGS.intersection(func.tags):
        return None
    if func._overloadpacket in _ALIASING_DESPITE_SCHEMA:
        return None
    wanted = _signature(schema)
    packet = func._overloadpacket
    for name in packet.overloads():
        candidate = getattr(packet, name)
        outs = [a for a in candidate._schema.arguments if a.is_out]
        if len(outs) == 1 and _signature(candidate._schema) == wanted:
            return OutputPlan(candidate, outs[0].name)
    return None


class _Walk:
    """One pass over an op's arguments: a cache key, the largest input, the output device."""

    __slots__ = ("biggest", "device", "cpu_scalar", "ok")

    def __init__(self) -> None:
        self.biggest = 0
        self.device: Optional[torch.device] = None
        self.cpu_scalar = False
        self.ok = True

    def key(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, (list, tuple)):
            return tuple(self.key(v) for v in value)
        if isinstance(value, _SCALARS):
            return value
        self.ok = False  # generators, SymInts, opaque objects: leave the op alone
        return None

    def _tensor(self, value: torch.Tensor) -> Any:
        if type(value) not in _PLAIN or value.layout is not torch.strided:
            self.ok = False
            return None
        device = value.device
        if device.type == "meta":
            self.ok = False
        elif value.dim() == 0 and device.type == "cpu":
            self.cpu_scalar = True  # CPU scalars mix with tensors of any device
        elif self.device is None:
            self.device = device
        elif device != self.device:
            self.ok = False
        nbytes = value.numel() * value.element_size()
        if nbytes > self.biggest:
            self.biggest = nbytes
        return (value.dtype, tuple(value.shape), value.stride(), device)

    def output_device(self) -> Optional[torch.device]:
        if self.device is None and self.cpu_scalar:
            return torch.device("cpu")
        return self.device


def output_layout(
    func: Any, plan: OutputPlan, args: tuple, kwargs: dict, threshold: int
) -> Optional[tuple[torch.device, Layout]]:
    """The output layout ``func`` would produce, when it needs at least ``threshold`` bytes
    and ``plan``'s out= overload has a kernel of its own for the output's device."""
    walk = _Walk()
    key = (func, walk.key(args), walk.key(tuple(sorted(kwargs.items()))) if kwargs else None)
    device = walk.output_device()
    if not walk.ok or device is None or walk.biggest * GROWTH_BOUND < threshold:
        return None
    try:
        layout = _LAYOUTS[key]
    except KeyError:
        layout = _meta_layout(func, args, kwargs)
        if len(_LAYOUTS) >= LAYOUT_CACHE_LIMIT:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    if layout is None or layout.nbytes < threshold or layout.nbytes == 0:
        return None
    if not has_backend_kernel(plan.out_op, device):
        return None
    return device, layout


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_to_meta(v) for v in value)
    return value


def _meta_layout(func: Any, args: tuple, kwargs: dict) -> Optional[Layout]:
    try:
        with no_python_dispatch():
            out = func(*_to_meta(args), **_to_meta(kwargs) if kwargs else {})
    except Exception:
        return None  # no meta kernel, data-dependent shape, or a bad call PyTorch will report itself
    if not isinstance(out, torch.Tensor) or out.storage_offset() != 0:
        return None
    size, stride = tuple(out.shape), tuple(out.stride())
    if 0 in size:
        nbytes = 0
    else:
        nbytes = (1 + sum((n - 1) * s for n, s in zip(size, stride))) * out.element_size()
    if nbytes != math.prod(size) * out.element_size() and any(s == 0 for s in stride):
        return None  # an expanded (overlapping) result: not a fresh dense output
    return Layout(size, stride, out.dtype, nbytes)
