"""Where a model's time goes under each allocator: perf's CPU-clock samples of its steady-state calls.

Wall time on a shared machine moves by 10% or more between two processes of the same setup, so a
gap of a few percent between poolscope and a peer cannot be read from it. The samples can: each
variant (an allocator setup of ``benchmarks/models.py``'s workloads) runs in a child process of its
own, warms up, then calls the workload in a loop while ``perf record -e cpu-clock`` samples every
thread for ``--seconds``; variants take turns, ``--rounds`` times. Each sample is put in one
category by its shared object and symbol, and the table gives CPU ms per call in each (all
threads): the kernels' own work, OpenMP workers waiting, the Python interpreter, the C library's
or the preloaded allocator's malloc/free, poolscope's engine, the kernel (page faults, system
calls), and the rest of the C library (memset, memcpy). What an allocator costs is the sum of its
own rows; the compute row is the same work under every allocator, and its spread between rounds
is the machine's noise.

Needs ``perf`` (Debian: ``linux-perf``) with the right to sample other processes (root, or
``kernel.perf_event_paranoid`` <= 1). Without it the table keeps the time, fault and CPU columns
and leaves the categories out.

Run:  python benchmarks/cpu_profile.py [--workload unet_ddim] [--variants "poolscope,tcmalloc,glibc,poolscope 256KiB,poolscope+tcmalloc"]
      [--seconds 15] [--rounds 2] [--context inference_mode]  (in .venv-models: scripts/bench-models sets it up)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _harness import Case, arguments, load_step, machine, markdown, peers, usage, write_json

HERE = Path(__file__).resolve().parent
RATE_HZ = 499
CATEGORIES = ("compute", "OpenMP wait", "Python", "malloc/free", "poolscope", "kernel", "libc other")
# The C library's allocator entry points and internals; a preloaded allocator counts whole.
_MALLOC = re.compile(
    r"malloc|_int_free|^free$|cfree|unlink_chunk|memalign|aligned_alloc|systrim|morecore|tcache|^realloc|calloc"
)


def category(dso: str, kind: str, symbol: str) -> str:
    if "poolscope" in dso:
        return "poolscope"
    if any(name in dso for name in ("tcmalloc", "jemalloc", "mimalloc")):
        return "malloc/free"
    if kind == "k":
        return "kernel"
    if dso.startswith("libc.so") or dso.startswith("libc-"):
        return "malloc/free" if _MALLOC.search(symbol) else "libc other"
    if dso.startswith("libgomp") or dso.startswith("libiomp"):
        return "OpenMP wait"
    if dso.startswith("libpython"):
        return "Python"
    return "compute"


def samples_by_category(data: Path) -> Counter[str]:
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "-n", "--no-children", "-g", "none", "--sort", "dso,sym",
         "--stdio", "-F", "sample,dso,sym", "-t", "\t"],
        capture_output=True, text=True, check=True,
    ).stdout
    counts: Counter[str] = Counter()
    for line in out.splitlines():
        fields = line.split("\t")
        if line.startswith("#") or len(fields) != 3 or not fields[0].strip().isdigit():
            continue
        symbol = fields[2].strip()
        kind = symbol[1] if symbol.startswith("[") else "."
        counts[category(fields[1].strip(), kind, symbol[4:])] += int(fields[0])
    return counts


def perf_problem() -> str | None:
    """Why perf cannot sample here, or None."""
    if shutil.which("perf") is None:
        return "perf is not installed (Debian package linux-perf)"
    probe = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o", os.devnull, "--", "true"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"perf cannot record here: {probe.stderr.strip().splitlines()[-1:]}"


def run_variant(case: Case, workload: str, params: dict[str, Any], seconds: float, sample: bool) -> dict[str, Any]:
    """One child: warm up, signal, call the workload in a loop until told to stop; perf samples it meanwhile."""
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile(mode="w+") as errors:
        ready, stop, data = Path(tmp) / "ready", Path(tmp) / "stop", Path(tmp) / "perf.data"
        # stderr to a file: a pipe nobody reads while the loop runs could fill and block the child.
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", workload, case.mode, json.dumps(params), str(ready), str(stop)],
            env={**os.environ, **case.env, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE, stderr=errors, text=True,
        )

        def failure() -> RuntimeError:
            errors.seek(0)
            return RuntimeError(f"{workload} [{case.label}] failed:\n{errors.read()[-3000:]}")

        while not ready.exists():
            if child.poll() is not None:
                raise failure()
            time.sleep(0.2)
        if sample:
            subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", str(RATE_HZ), "-p", str(child.pid), "-o", str(data),
                            "--", "sleep", str(seconds)], capture_output=True, check=True)
        else:
            time.sleep(seconds)
        stop.touch()
        stdout, _ = child.communicate(timeout=600)
        if child.returncode != 0:
            raise failure()
        result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
        if sample:
            calls = seconds * 1e3 / result["ms"]
            per_sample_ms = 1e3 / RATE_HZ
            result["categories"] = {k: v * per_sample_ms / calls for k, v in samples_by_category(data).items()}
        return result


def child(workload: str, mode: str, params: dict[str, Any], ready: str, stop: str) -> dict[str, Any]:
    step = load_step(HERE / "models.py", workload, mode, params)
    step()
    step()
    Path(ready).write_text(str(os.getpid()))
    times, faults, user, system = [], [], [], []
    while not os.path.exists(stop) or not times:
        (f0, u0, s0), t0 = usage(), time.perf_counter()
        step()
        t1, (f1, u1, s1) = time.perf_counter(), usage()
        times.append(t1 - t0)
        faults.append(f1 - f0)
        user.append(u1 - u0)
        system.append(s1 - s0)
    med = statistics.median
    return {"calls": len(times), "ms": med(times) * 1e3, "faults": med(faults), "user_ms": med(user) * 1e3,
            "sys_ms": med(system) * 1e3}


def main() -> int:
    import models

    parser = arguments(__doc__, rounds=2, only=False)
    parser.add_argument("--workload", default="unet_ddim", help="a function of benchmarks/models.py (default unet_ddim)")
    parser.add_argument("--variants", default="poolscope,tcmalloc,glibc,poolscope 256KiB,poolscope+tcmalloc",
                        help="comma-separated: poolscope, 'poolscope <threshold>', 'poolscope+<peer>' (poolscope over that "
                             "allocator), plain, glibc, jemalloc, mimalloc, tcmalloc")
    parser.add_argument("--seconds", type=float, default=15.0, help="sampled seconds per variant and round")
    parser.add_argument("--context", default="inference_mode")
    args = parser.parse_args()
    workload, seconds, rounds = args.workload, args.seconds, args.rounds
    params: dict[str, Any] = {"context": args.context}
    variants = args.variants
    if args.smoke:  # a model every environment has, at its smoke size
        workload, seconds, rounds, variants = "longnet_example", 2.0, 1, "plain,poolscope"
        params.update(next(smoke for fn, _, smoke in models.MODELS.values() if fn == workload))
    envs, missing = peers()
    cases = []
    for name in (v.strip() for v in variants.split(",")):
        if name.startswith("poolscope+") and name[len("poolscope+"):] in envs:  # poolscope over a preloaded allocator
            cases.append(Case(name, "pooled", envs[name[len("poolscope+"):]]))
        elif name.startswith("poolscope"):
            threshold = name[len("poolscope"):].strip()
            cases.append(Case(name, "pooled", {"POOLSCOPE_THRESHOLD": threshold} if threshold else {}))
        elif name in envs:
            cases.append(Case(name, "plain", envs[name]))
        else:
            print(f"skipped {name}: " + ("; ".join(m for m in missing if m.startswith(name)) or "unknown variant"))
    problem = perf_problem()
    runs: list[tuple[int, Case, dict[str, Any]]] = []
    for r in range(rounds):
        for case in cases[r % len(cases):] + cases[: r % len(cases)]:
            result = run_variant(case, workload, dict(params), seconds, sample=problem is None)
            runs.append((r + 1, case, result))
            print(f"  round {r + 1} {case.label:<20} {result['ms']:9.1f} ms per call", flush=True)
    print(f"\nmachine: {machine()}; workload {workload} {params}; {seconds:g} s sampled per variant and round")
    if problem:
        print(f"no categories: {problem}")
    header = ["workload", "variant", "round", "ms per call", "faults per call", "CPU user / sys ms"]
    if problem is None:
        header += [f"{c} ms" for c in CATEGORIES] + ["allocator total ms"]
    rows = []
    for r, case, res in sorted(runs, key=lambda run: (cases.index(run[1]), run[0])):
        row = [workload, case.label, str(r), f"{res['ms']:.0f}", f"{res['faults']:.0f}", f"{res['user_ms']:.0f} / {res['sys_ms']:.0f}"]
        if problem is None:
            cat = res["categories"]
            row += [f"{cat.get(c, 0.0):.1f}" for c in CATEGORIES]
            row.append(f"{sum(cat.get(c, 0.0) for c in ('malloc/free', 'poolscope', 'kernel', 'libc other')):.1f}")
        rows.append(row)
    print(markdown(header, rows))
    out = write_json(args.out, "profile-smoke.json" if args.smoke else f"profile-{workload}.json",
                     {"machine": machine(), "workload": workload, "params": params, "seconds": seconds, "perf": problem or "ok",
                      "runs": [{"round": r, "variant": c.label, **res} for r, c, res in runs]})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        w, m, p, ready_file, stop_file = sys.argv[2:7]
        print(json.dumps(child(w, m, json.loads(p), ready_file, stop_file)))
    else:
        raise SystemExit(main())
