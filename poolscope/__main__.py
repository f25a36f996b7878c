"""``python -m poolscope``: run a long-sequence attention workload plain and pooled and report.

Example::

    python -m poolscope --seq-len 32768 --snapshot pool.pickle
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ._config import DEFAULT_THRESHOLD, parse_device, parse_threshold
from ._demo import BRANCHES, run_demo
from ._pool import get_pool
from ._report import report
from ._snapshot import dump_snapshot


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m poolscope",
        description="Run LongNet-style dilated attention plain and inside a pool scope; print the "
        "per-scope report and the speedup.",
    )
    parser.add_argument("--seq-len", type=int, default=16384, help="tokens (a multiple of 1024; default 16384)")
    parser.add_argument("--device", default="cpu", help="device to run on (default cpu)")
    parser.add_argument("--threshold", default=str(DEFAULT_THRESHOLD), help="smallest pooled allocation, e.g. 1MiB")
    parser.add_argument("--repeats", type=int, default=7, help="timed forwards of each kind (default 7)")
    parser.add_argument(
        "--capture",
        choices=("factories", "all"),
        default="all",
        help="what the scope pools: factory calls only, or op outputs too (default all)",
    )
    parser.add_argument("--snapshot", metavar="PATH", help="write a memory snapshot (pickle) with profiling on")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
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
    result = run_demo(
        args.seq_len, device, threshold, args.repeats, capture=args.capture, profile=args.snapshot is not None
    )
    print(f"plain : {result.plain_ms:9.1f} ms per forward (median of {args.repeats})")
    print(f"pooled: {result.pooled_ms:9.1f} ms per forward  -> {result.speedup:.2f}x")
    print(f"outputs bit-identical: {'yes' if result.identical else 'NO'}")
    print()
    print(report())
    print()
    print(get_pool(device).stats())
    if args.snapshot:
        dump_snapshot(args.snapshot)
        print(f"snapshot written to {args.snapshot}; view it with "
              f"`python -m torch.cuda._memory_viz trace_plot {args.snapshot} -o pool.html`")
    return 0 if result.identical else 1


if __name__ == "__main__":
    sys.exit(main())
