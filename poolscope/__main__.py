"""``python -m poolscope``: run a long-sequence attention workload plain and pooled, and report.

``python -m poolscope build`` builds the native engine for this torch ahead of time.

Example::

    python -m poolscope --seq-len 32768 --snapshot pool.pickle
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ._config import BUILTIN_THRESHOLD, parse_device, parse_threshold
from ._demo import BRANCHES, run_demo
from ._report import report
from ._snapshot import dump_snapshot


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poolscope",
        description="Run LongNet-style dilated attention plain and inside a pool scope; print the speedup and "
        "the per-scope report. `python -m poolscope build` builds the native engine and exits.",
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


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:
        return _build()
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
