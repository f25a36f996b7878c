"""``python -m poolscope``: run a long-sequence attention workload plain and pooled, and report.

``python -m poolscope build`` builds the native engine for this torch ahead of time.
``python -m poolscope compare MODULE:CALLABLE`` says whether a scope helps your own call.

Example::

    python -m poolscope --seq-len 32768 --snapshot pool.pickle
    python -m poolscope compare my_model.py:forward --calls 10
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Optional

from ._config import BUILTIN_THRESHOLD, parse_device, parse_threshold
from ._demo import BRANCHES, run_demo
from ._report import report
from ._snapshot import dump_snapshot


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poolscope",
        description="Run LongNet-style dilated attention plain and inside a pool scope; print the speedup and "
        "the per-scope report. `python -m poolscope build` builds the native engine and exits; "
        "`python -m poolscope compare MODULE:CALLABLE` measures your own call (see its --help).",
    )
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens, a multiple of 1024 (default: 16384)")
    parser.add_argument("--device", default="cpu", help="device to run on (default: cpu)")
    parser.add_argument(
        "--threshold", default="1MiB", help=f"smallest pooled allocation, e.g. 512KiB (default: 1MiB = {BUILTIN_THRESHOLD})"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards of each kind (default: 7)")
    parser.add_argument("--snapshot", metavar="PATH", help="also write a memory snapshot (pickle), profiling on")
    return parser


def _build() -> int:
    from .engines.build import BuildError, build_dir, load

    try:
        load(verbose=False, rebuild_broken=True)
        where = build_dir()
    except BuildError as exc:
        print(f"poolscope: the native engine could not be built: {exc}", file=sys.stderr)
        return 1
    print(f"poolscope: native engine ready in {where}")
    return 0


def _compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poolscope compare",
        description="Call CALLABLE (no arguments) plain and inside a pool scope, alternating, and say whether the "
        "scope helps: median times, page faults, peak RSS, identical outputs, and a verdict with its reason.",
    )
    parser.add_argument(
        "target", metavar="MODULE:CALLABLE",
        help="what to call, with no arguments: an importable module (pkg.mod:run) or a file (path/to/script.py:run); "
        "build the model and its inputs at module level or inside the callable's closure",
    )
    parser.add_argument("--calls", type=int, default=10, help="timed rounds, one call each way (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls each way first (default: 2)")
    parser.add_argument("--context", default="inference_mode", help="inference_mode (default), no_grad or grad")
    parser.add_argument("--threshold", default=None, help="the scope's threshold, e.g. 256KiB (default: 1MiB)")
    parser.add_argument("--budget-s", type=float, default=120.0, help="stop timing after this many seconds (default: 120)")
    return parser


def _load_target(target: str) -> Any:
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:CALLABLE such as my_model.py:run or pkg.models:run; got {target!r}")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        if not path.is_file():
            raise ValueError(f"no such file: {module_name!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))  # the file's own imports of its neighbours
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target!r} is {type(obj).__name__}, not something to call")
    return obj


def _compare(argv: list[str]) -> int:
    from ._compare import compare

    parser = _compare_parser()
    args = parser.parse_args(argv)
    try:
        fn = _load_target(args.target)
    except (ImportError, AttributeError, ValueError) as exc:
        parser.error(f"cannot load {args.target!r}: {exc}")
    scope_kwargs = {} if args.threshold is None else {"threshold": args.threshold}
    try:
        result = compare(fn, calls=args.calls, warmup=args.warmup, context=args.context, scope_kwargs=scope_kwargs,
                         budget_s=args.budget_s)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    print(result)
    return 0 if result.identical else 1


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        return _build()
    if argv[:1] == ["compare"]:
        return _compare(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    longest = BRANCHES[-1][0]
    if args.seq_len < longest or args.seq_len % longest:
        parser.error(f"--seq-len must be a positive multiple of {longest}; got {args.seq_len}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    try:
        device = parse_device(args.device)
        threshold = parse_threshold(args.threshold)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    result = run_demo(args.seq_len, device, threshold, args.repeats, profile=args.snapshot is not None)
    print(f"plain : {result.plain_ms:9.1f} ms per forward (median of {args.repeats})")
    print(f"pooled: {result.pooled_ms:9.1f} ms per forward  -> {result.speedup:.2f}x")
    print(f"outputs bit-identical: {'yes' if result.identical else 'NO'}")
    print()
    print(report())
    if args.snapshot:
        dump_snapshot(args.snapshot)
        print(f"\nsnapshot written to {args.snapshot}; view it with "
              f"`python -m torch.cuda._memory_viz trace_plot {args.snapshot} -o pool.html`")
    return 0 if result.identical else 1


if __name__ == "__main__":
    sys.exit(main())
