"""What the benchmark scripts share: each case runs in a child process of its own, under one
allocator setup, and the cases of a workload run in turn, round after round (side by side,
interleaved), so that a noisy machine slows all of them alike. Figures are medians.

A child imports torch (and poolscope only for the pooled modes), builds a workload's step for
one mode, warms it up, times ``repeats`` steps, and reports on stdout as JSON: per-step times,
minor page faults per step, peak RSS (VmHWM) and RSS at the end, after the workload's tensors
are gone and a garbage collection ran, and, with the parameter ``idle_s``, RSS once the process
has been idle that long (what allocators that release memory by time still hold).

Allocator setups ("peers"): plain; glibc told never to give big blocks back
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, PyTorch's own tuning advice for CPU);
jemalloc, mimalloc and tcmalloc through ``LD_PRELOAD`` where the library is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
GLIBC_NEVER_GIVE_BACK = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
PRELOADS = {  # name: (library file names, the Debian package that provides it)
    "jemalloc": (("libjemalloc.so.2",), "libjemalloc2"),
    "mimalloc": (("libmimalloc.so.2", "libmimalloc.so"), "libmimalloc2.0"),
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "libtcmalloc-minimal4"),
}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_library(names: tuple[str, ...]) -> Optional[str]:
    for d in LIB_DIRS:
        for n in names:
            p = Path(d) / n
            if p.exists():
                return str(p)
    return None


def peers(wanted: tuple[str, ...] = ("plain", "glibc", "jemalloc", "mimalloc", "tcmalloc")) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The allocator setups available here (name -> environment), and a note per missing one."""
    found: dict[str, dict[str, str]] = {}
    missing: list[str] = []
    for name in wanted:
        if name == "plain":
            found[name] = {}
        elif name == "glibc":
            found[name] = dict(GLIBC_NEVER_GIVE_BACK)
        else:
            names, package = PRELOADS[name]
            lib = find_library(names)
            if lib is None:
                missing.append(f"{name} (Debian package {package}) is not installed")
            else:
                found[name] = {"LD_PRELOAD": lib}
    return found, missing


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} cores, {model}, torch {torch.__version__}, Python {platform.python_version()}"


# --- what every benchmark script shares --------------------------------------------------------


def scope_for(mode: str) -> Callable[..., Any]:
    """The context a workload's step runs in: ``pool_scope`` for "pooled", a no-op otherwise."""
    if mode != "pooled":
        return contextlib.nullcontext
    import poolscope

    return poolscope.pool_scope


def scoped(mode: str, body: Callable[[], Any], *args: Any) -> Callable[[], Any]:
    """``body`` as it runs in ``mode``: one ``pool_scope(*args)`` around each call for "pooled"."""
    if mode != "pooled":
        return body
    scope = scope_for(mode)

    def step() -> Any:
        with scope(*args):
            return body()

    return step


def arguments(doc: Optional[str], rounds: int, repeats: Optional[int] = None, only: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes: rounds, repeats, where results go, a smoke run, a filter."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--rounds", type=int, default=rounds, help=f"child processes per case (default {rounds})")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help=f"timed steps per child (default {repeats})")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs")
    if only:
        parser.add_argument("--only", help="run the workloads whose name contains this")
    return parser


@dataclass
class Case:
    """One column of a workload's row: a mode of the workload under an allocator setup."""

    label: str
    mode: str
    env: dict[str, str] = field(default_factory=dict)


# --- the child side ----------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _usage() -> tuple[int, float, float]:
    """Minor page faults, user and system CPU seconds of the process so far (every thread)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_minflt, u.ru_utime, u.ru_stime


def _child(script: str, workload: str, mode: str, params: dict[str, Any]) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(int(params.pop("threads", os.cpu_count() or 1)))
    spec = importlib.util.spec_from_file_location("workloads", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    repeats, warmup = params.pop("repeats"), params.pop("warmup")
    idle_s = float(params.pop("idle_s", 0))
    step: Callable[[], Any] = getattr(module, workload)(mode, **params)
    for _ in range(warmup):
        step()
    times, faults, user, system = [], [], [], []
    for _ in range(repeats):
        (f0, u0, s0), t0 = _usage(), time.perf_counter()
        result = step()
        times.append(time.perf_counter() - t0)
        f1, u1, s1 = _usage()
        faults.append(f1 - f0)
        user.append(u1 - u0)
        system.append(s1 - s0)
        del result
    report = getattr(step, "report", lambda: {})
    gc.collect()
    end = {"peak_rss": _status("VmHWM:"), "end_rss": _status("VmRSS:")}  # before the report, which may release memory
    if idle_s > 0:  # what the setup still holds once the process has been idle that long
        time.sleep(idle_s)
        end["idle_rss"] = _status("VmRSS:")
    return {"times": times, "faults": faults, "user": user, "system": system, **end, **report()}


def run_child(script: Path, workload: str, case: Case, params: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    env = {**os.environ, **case.env, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, str(HERE / "_harness.py"), str(script), workload, case.mode, json.dumps(params)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{workload} [{case.label}] failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def side_by_side(
    script: Path, workload: str, cases: list[Case], params: dict[str, Any], rounds: int, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Every case of a workload, one child each, in turn for ``rounds`` rounds; per-case medians."""
    per_case: dict[str, list[dict[str, Any]]] = {c.label: [] for c in cases}
    for r in range(rounds):
        order = cases[r % len(cases):] + cases[: r % len(cases)]  # rotate who goes first
        for case in order:
            per_case[case.label].append(run_child(script, workload, case, dict(params)))
    summary = {}
    for label, runs in per_case.items():
        step_medians = [statistics.median(run["times"]) for run in runs]
        summary[label] = {
            "ms": statistics.median(step_medians) * 1e3,
            "round_ms": [m * 1e3 for m in step_medians],  # one median per round, in round order
            "user_ms": statistics.median(statistics.median(run["user"]) for run in runs) * 1e3,
            "sys_ms": statistics.median(statistics.median(run["system"]) for run in runs) * 1e3,
            "ms_min": min(min(run["times"]) for run in runs) * 1e3,
            "ms_max": max(max(run["times"]) for run in runs) * 1e3,
            "faults": statistics.median(statistics.median(run["faults"]) for run in runs),
            "peak_rss_mib": statistics.median(run["peak_rss"] for run in runs) / 2**20,
            "end_rss_mib": statistics.median(run["end_rss"] for run in runs) / 2**20,
            **({"idle_rss_mib": statistics.median(run["idle_rss"] for run in runs) / 2**20} if "idle_rss" in runs[0] else {}),
            "extra": {k: v for k, v in runs[-1].items()
                      if k not in ("times", "faults", "user", "system", "peak_rss", "end_rss", "idle_rss")},
        }
        log(f"  {workload:<28} {label:<22} {summary[label]['ms']:10.3f} ms  faults {summary[label]['faults']:>8.0f}")
    return summary


def versus_fastest(summary: dict[str, dict[str, Any]], label: str, peers: list[str]) -> Optional[tuple[float, float, float, str]]:
    """``label``'s time over the fastest of ``peers`` in each round: (median, min, max, fastest overall)."""
    present = [p for p in peers if p in summary]
    if not present:
        return None
    rounds = len(summary[label]["round_ms"])
    ratios = [summary[label]["round_ms"][r] / min(summary[p]["round_ms"][r] for p in present) for r in range(rounds)]
    fastest = min(present, key=lambda p: summary[p]["ms"])
    return statistics.median(ratios), min(ratios), max(ratios), fastest


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(out_dir: Path, name: str, data: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(data, indent=2))
    return path


if __name__ == "__main__":
    script_arg, workload_arg, mode_arg, params_arg = sys.argv[1:5]
    print(json.dumps(_child(script_arg, workload_arg, mode_arg, json.loads(params_arg))))
