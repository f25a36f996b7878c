"""Run PyTorch's own OpInfo database with and without a scope and compare everything that can differ.

For each op, float32 and one more dtype it supports (an integer or complex one), each sample
input, and each context (``no_grad``, ``inference_mode``, autograd with gradients), the op runs:

- plain, twice (outputs that differ from one plain run to the next mark the sample as
  nondeterministic on its own: set aside, not compared);
- in ``pool_scope(threshold=1)`` (everything routes), twice, with the pool's idle memory
  filled with a different garbage byte before each (outputs that change with the garbage
  come from memory a kernel read without writing, or left unwritten).

Compared bit for bit with the plain run: output values (NaNs included), dtype, shape,
strides, storage offset and size, which inputs each output aliases, ``is_inference``,
``requires_grad``, gradients of the inputs, the exception (type and message) of a failing
call, and the RNG state afterwards. Samples with Python scalars run again with each scalar
retyped to an equal value of another type (2 -> 2.0, 1.0 -> 1, True -> 1). Error inputs run
too. Ops whose contract is uninitialised memory (``empty`` and friends) are compared in
everything but values.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

import poolscope
from poolscope.engines import engine_for

UNINITIALISED = {"empty", "empty_like", "new_empty", "new_empty_strided", "empty_strided", "empty_permuted"}
CONTEXTS = ("no_grad", "inference_mode", "grad")
GARBAGE = (0xA5, 0x5A)


@dataclass
class Outcome:
    """Everything observable about one call."""

    error: Optional[tuple[str, str]] = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    grads: list[Optional[bytes]] = field(default_factory=list)
    rng: bytes = b""


@dataclass
class Tally:
    ops: set[str] = field(default_factory=set)
    samples: int = 0
    comparisons: int = 0
    nondeterministic: dict[str, int] = field(default_factory=dict)
    garbage_dependent: dict[str, str] = field(default_factory=dict)  # op -> an example
    mismatches: list[str] = field(default_factory=list)
    skipped_ops: dict[str, str] = field(default_factory=dict)
    harness_skipped: dict[str, str] = field(default_factory=dict)  # op -> why a sample could not be compared

    def summary(self) -> dict[str, Any]:
        return {
            "ops": len(self.ops),
            "samples": self.samples,
            "comparisons": self.comparisons,
            "mismatches": self.mismatches,
            "nondeterministic_on_their_own": self.nondeterministic,
            "output_depends_on_uninitialised_memory": self.garbage_dependent,
            "ops_not_run": self.skipped_ops,
            "samples_the_harness_could_not_compare": self.harness_skipped,
        }


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


def _bytes(t: torch.Tensor) -> bytes:
    t = t.detach()
    if t.layout != torch.strided or t.device.type != "cpu" or t.numel() == 0:
        return b""
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t)  # always a fresh, packed layout
    return dense.view(-1).view(torch.uint8).numpy().tobytes()


def _describe(t: torch.Tensor, inputs: list[torch.Tensor], values: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"dtype": t.dtype, "shape": tuple(t.shape), "layout": t.layout, "requires_grad": t.requires_grad}
    if t.layout == torch.strided and t.device.type == "cpu":
        storage = t.untyped_storage()
        d.update(
            stride=t.stride(),
            offset=t.storage_offset(),
            storage_bytes=storage.nbytes(),
            is_inference=t.is_inference(),
            aliases=tuple(
                i for i, x in enumerate(inputs)
                if x.layout == torch.strided and x.device.type == "cpu" and storage.nbytes()
                and x.untyped_storage().data_ptr() == storage.data_ptr()
            ),
        )
        if values:
            d["bytes"] = _bytes(t)
    return d


def _clone(tree: Any) -> Any:
    """Inputs as they were, in the same layouts, with fresh autograd leaves."""
    if isinstance(tree, torch.Tensor):
        if tree.layout != torch.strided or tree.device.type != "cpu":
            return tree.detach().clone().requires_grad_(tree.requires_grad)
        # A copy of the whole storage, viewed the same way: expanded (overlapping) inputs stay so.
        src = tree.detach()
        out = torch.empty(0, dtype=src.dtype).set_(
            src.untyped_storage().clone(), src.storage_offset(), src.shape, src.stride()
        )
        if src.is_conj():
            out = out.conj()
        if src.is_neg():
            out = torch._neg_view(out)
        return out.requires_grad_(tree.requires_grad)
    if isinstance(tree, list):
        return [_clone(x) for x in tree]
    if isinstance(tree, tuple):
        return tuple(_clone(x) for x in tree)
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return copy.copy(tree)


def _call(op: Any, sample: Any, context: str, values: bool) -> Outcome:
    args = _clone((sample.input, sample.args, sample.kwargs))
    inp, a, kw = args
    inputs = list(_tensors(args))
    torch.manual_seed(1234)
    outcome = Outcome()
    try:
        if context == "grad":
            out = op(inp, *a, **kw)
        else:
            with getattr(torch, context)():
                out = op(inp, *a, **kw)
    except Exception as exc:  # noqa: BLE001 - the exception is what we compare
        outcome.error = (type(exc).__name__, str(exc))
        outcome.rng = _bytes(torch.get_rng_state())
        return outcome
    outs = list(_tensors(out))
    outcome.outputs = [_describe(t, inputs, values) for t in outs]
    if context == "grad":
        leaves = [x for x in inputs if x.requires_grad and x.is_leaf]
        diff = [t for t in outs if t.requires_grad and t.grad_fn is not None and (t.is_floating_point() or t.is_complex())]
        if leaves and diff:
            try:
                grads = torch.autograd.grad(
                    [t.real.sum() if t.is_complex() else t.sum() for t in diff], leaves, allow_unused=True
                )
                outcome.grads = [None if g is None else _bytes(g) for g in grads]
            except Exception as exc:  # noqa: BLE001
                outcome.grads = [f"{type(exc).__name__}: {exc}".encode()]
    outcome.rng = _bytes(torch.get_rng_state())
    return outcome


def _retyped(sample: Any) -> list[Any]:
    """Copies of ``sample`` with each Python scalar argument replaced by an equal scalar of another type."""
    variants = []

    def other(x: Any) -> Optional[Any]:
        if type(x) is bool:
            return int(x)
        if type(x) is int:
            return float(x)
        if type(x) is float and math.isfinite(x) and x == int(x):
            return int(x)
        return None

    for i, arg in enumerate(sample.args):
        swapped = other(arg)
        if swapped is not None:
            v = copy.copy(sample)
            v.args = tuple(swapped if j == i else x for j, x in enumerate(sample.args))
            variants.append(v)
    for key, arg in sample.kwargs.items():
        swapped = other(arg)
        if swapped is not None:
            v = copy.copy(sample)
            v.kwargs = {**sample.kwargs, key: swapped}
            variants.append(v)
    return variants


def _dtypes(op: Any) -> list[torch.dtype]:
    supported = op.supported_dtypes("cpu")
    picked = [torch.float32] if torch.float32 in supported else []
    for dtype in (torch.int64, torch.complex64, torch.bool, torch.int32, torch.float64):
        if dtype in supported:
            picked.append(dtype)
            break
    return picked


def _diff(a: Outcome, b: Outcome) -> Optional[str]:
    if a.error != b.error:
        return f"error {a.error} vs {b.error}"
    if len(a.outputs) != len(b.outputs):
        return f"{len(a.outputs)} outputs vs {len(b.outputs)}"
    for i, (x, y) in enumerate(zip(a.outputs, b.outputs)):
        for key in x:
            if x.get(key) != y.get(key):
                return f"output {i} {key}: {x.get(key) if key != 'bytes' else '...'} vs {y.get(key) if key != 'bytes' else '...'}"
    if a.grads != b.grads:
        return "gradients differ"
    if a.rng != b.rng:
        return "RNG state differs"
    return None


def sweep(ops: Iterable[Any], pool: poolscope.TensorPool, tally: Tally, contexts: tuple[str, ...] = CONTEXTS,
          max_samples: Optional[int] = None, scope: Optional[Callable[[], Any]] = None,
          known_nondeterministic: frozenset[str] = frozenset()) -> Tally:
    """Compare plain runs with runs inside ``scope()`` (default: a scope on ``pool`` routing everything).

    Ops in ``known_nondeterministic`` give different bits from one plain call to the next (shown
    by a test of their own); their differences are counted as such, not as mismatches.
    """
    scoped = scope or (lambda: poolscope.pool_scope(pool=pool, threshold=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ops' own deprecation warnings, thousands of them
        fill = functools.partial(engine_for(pool.device).module._test.fill_free, pool._backend)  # type: ignore[attr-defined]
        return _sweep(ops, Run(fill, scoped, tally, known_nondeterministic), contexts, max_samples)


@dataclass
class Run:
    fill: Callable[[int], None]
    scope: Callable[[], Any]
    tally: Tally
    known_nondeterministic: frozenset[str]


def _sweep(ops: Iterable[Any], run: Run, contexts: tuple[str, ...], max_samples: Optional[int]) -> Tally:
    tally = run.tally
    for op in ops:
        name = op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")
        dtypes = _dtypes(op)
        if not dtypes:
            tally.skipped_ops[name] = "no dtype poolscope's sweep runs (float32, int, complex, bool)"
            continue
        tally.ops.add(name)
        values = op.name not in UNINITIALISED
        for dtype in dtypes:
            for context in contexts:
                grad = context == "grad" and op.supports_autograd and (dtype.is_floating_point or dtype.is_complex)
                if context == "grad" and not grad:
                    continue
                try:
                    samples = list(op.sample_inputs("cpu", dtype, requires_grad=grad))
                except Exception as exc:  # noqa: BLE001 - an OpInfo that cannot build samples here
                    tally.skipped_ops[name] = f"sample_inputs: {type(exc).__name__}: {exc}"[:200]
                    continue
                if max_samples is not None:
                    samples = samples[:max_samples]
                for sample in samples + [v for s in samples for v in _retyped(s)]:
                    _compare_one(op, name, sample, context, dtype, values, run)
        if op.error_inputs_func is not None:
            for error in op.error_inputs("cpu"):
                _compare_one(op, name, error.sample_input, "no_grad", None, values, run)
    return tally


def _compare_one(op: Any, name: str, sample: Any, context: str, dtype: Any, values: bool, run: Run) -> None:
    run.tally.samples += 1
    try:
        _compare(op, name, sample, context, dtype, values, run)
    except Exception as exc:  # noqa: BLE001 - the harness could not copy or describe this sample
        run.tally.harness_skipped[name] = f"{type(exc).__name__}: {exc}"[:200]


def _compare(op: Any, name: str, sample: Any, context: str, dtype: Any, values: bool, run: Run) -> None:
    tally = run.tally
    where = f"{name} [{dtype}, {context}] {sample.summary() if hasattr(sample, 'summary') else ''}"[:300]
    plain = _call(op, sample, context, values)
    if name in run.known_nondeterministic or _diff(plain, _call(op, sample, context, values)) is not None:
        tally.nondeterministic[name] = tally.nondeterministic.get(name, 0) + 1
        return
    pooled = []
    for garbage in GARBAGE:
        run.fill(garbage)
        with run.scope():
            pooled.append(_call(op, sample, context, values))
    if _diff(pooled[0], pooled[1]) is not None:
        # The kernel reads memory it did not write (or leaves output unwritten): the result is
        # whatever was in memory, with or without a pool. Listed with an example, not compared.
        tally.garbage_dependent.setdefault(name, where)
        return
    tally.comparisons += 1
    problem = _diff(plain, pooled[0])
    if problem is not None:
        tally.mismatches.append(f"{where}: {problem}")


def _passthrough_dispatch_mode() -> Any:
    """A TorchDispatchMode that only forwards every op: what any operator-level engine puts on the stack."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Forward(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            return func(*args, **(kwargs or {}))

    return Forward()


def main() -> int:
    """``python tests/opinfo_sweep.py [--quick] [--dispatch-mode] [--out report.json]``."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--quick", action="store_true", help="the CI subset instead of every op")
    parser.add_argument("--dispatch-mode", action="store_true",
                        help="compare plain runs with runs under a do-nothing TorchDispatchMode instead of a scope")
    parser.add_argument("--out", help="write the summary here as JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    import test_opinfo

    ops = test_opinfo.quick_ops() if args.quick else test_opinfo.op_db
    pool = poolscope.TensorPool("cpu", release_after=0)
    tally = sweep(ops, pool, Tally(), max_samples=6 if args.quick else None,
                  scope=_passthrough_dispatch_mode if args.dispatch_mode else None,
                  known_nondeterministic=test_opinfo.KNOWN_NONDETERMINISTIC)
    summary = tally.summary()
    text = json.dumps(summary, indent=2, default=str)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text[:4000])
    return 0 if not tally.mismatches else 1


if __name__ == "__main__":
    raise SystemExit(main())
