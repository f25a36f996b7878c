"""What the benchmark scripts share: each case runs in a child process of its own, under one
allocator setup, and the cases of a workload make their timed calls in turn, call by call (side
by side, interleaved), so that a machine whose speed drifts slows all of them alike. Figures are
medians.

In each round every case's child starts at once, imports torch (and poolscope only for the
pooled modes), builds a workload's step for its mode and warms it up. Then the parent asks the
children for one timed call each, in turn, ``repeats`` times (a *turn* is one call of every case,
a few seconds apart at most), rotating who goes first. A child reports each call on stdout as
JSON (time, minor page faults, user and system CPU) and, at the end, peak RSS (VmHWM) and RSS
after the workload's tensors are gone and a garbage collection ran, and, with the parameter
``idle_s``, RSS once the process has been idle that long (what allocators that release memory by
time still hold).

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
import tempfile
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


def usage() -> tuple[int, float, float]:
    """Minor page faults, user and system CPU seconds of the process so far (every thread)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_minflt, u.ru_utime, u.ru_stime


IDLE_IGNORED_S = 600  # poolscope's release_idle_s in pooled children (see _Child)
_REPLY = "@@harness "  # marks the child's protocol lines among whatever a workload prints


def reply(message: dict[str, Any]) -> None:
    """In a child: answer the parent (``ChildProcess.ask``)."""
    print(_REPLY + json.dumps(message), flush=True)


def load_step(script: str | Path, workload: str, mode: str, params: dict[str, Any]) -> Callable[[], Any]:
    """In a child: the thread count set, ``workload`` of ``script`` built for ``mode`` with ``params``."""
    import torch

    torch.set_num_threads(int(params.pop("threads", os.cpu_count() or 1)))
    spec = importlib.util.spec_from_file_location("workloads", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step: Callable[[], Any] = getattr(module, workload)(mode, **params)
    return step


def _serve(script: str, workload: str, mode: str, params: dict[str, Any]) -> None:
    """The child: build and warm up, then one timed call per "call" line on stdin; "end" reports."""
    import gc

    params.pop("repeats")  # the parent counts the calls
    warmup, idle_s = params.pop("warmup"), float(params.pop("idle_s", 0))
    step = load_step(script, workload, mode, params)
    for _ in range(warmup):
        step()
    reply({"ready": True})
    for line in sys.stdin:
        if line.strip() != "call":
            break
        (f0, u0, s0), t0 = usage(), time.perf_counter()
        result = step()
        elapsed = time.perf_counter() - t0
        f1, u1, s1 = usage()
        del result
        reply({"time": elapsed, "faults": f1 - f0, "user": u1 - u0, "system": s1 - s0})
    report = getattr(step, "report", lambda: {})
    gc.collect()
    end = {"peak_rss": _status("VmHWM:"), "end_rss": _status("VmRSS:")}  # before the report, which may release memory
    if idle_s > 0:  # what the setup still holds once the process has been idle that long
        time.sleep(idle_s)
        end["idle_rss"] = _status("VmRSS:")
    reply({**end, **report()})


class ChildProcess:
    """A child process answering requests on stdin with ``reply()`` lines (the rest of its stdout is ignored)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.errors = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill and block the child
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
            env={**os.environ, **env, "PYTHONWARNINGS": "ignore"},
        )

    def send(self, request: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(request + "\n")
        self.process.stdin.flush()

    def ask(self, request: Optional[str] = None) -> dict[str, Any]:
        """Send ``request`` (None: only wait) and return the child's next reply."""
        assert self.process.stdout is not None
        if request is not None:
            self.send(request)
        for line in self.process.stdout:
            if line.startswith(_REPLY):
                reply: dict[str, Any] = json.loads(line[len(_REPLY):])
                return reply
        self.process.wait()
        self.errors.seek(0)
        raise RuntimeError(f"{self.name} failed (exit {self.process.returncode}):\n{self.errors.read()[-3000:]}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.errors.close()


class _Child(ChildProcess):
    """One case's child process (``_serve``)."""

    def __init__(self, script: Path, workload: str, case: Case, params: dict[str, Any]) -> None:
        env = dict(case.env)
        if case.mode == "pooled":
            # A child waits for the others' calls between two of its own (BERT: 6 x 3 s): poolscope would
            # take a wait over release_idle_s (10 s) for idleness and release its cache, which a loop
            # calling back to back never does. Unless the case or the caller sets it, waits do not count.
            env.setdefault("POOLSCOPE_RELEASE_IDLE_S", os.environ.get("POOLSCOPE_RELEASE_IDLE_S", str(IDLE_IGNORED_S)))
        argv = [sys.executable, str(HERE / "_harness.py"), str(script), workload, case.mode, json.dumps(params)]
        super().__init__(f"{workload} [{case.label}]", argv, env)


def _round(script: Path, workload: str, cases: list[Case], params: dict[str, Any], repeats: int, first: int) -> list[dict[str, Any]]:
    """One child per case, started together; ``repeats`` turns of one timed call each; their reports."""
    children = [_Child(script, workload, case, dict(params)) for case in cases]
    try:
        for child in children:
            child.ask()  # built and warmed up
        calls: list[list[dict[str, Any]]] = [[] for _ in cases]
        for turn in range(repeats):
            k = (first + turn) % len(cases)  # rotate who goes first
            for i in list(range(k, len(cases))) + list(range(k)):
                calls[i].append(children[i].ask("call"))
        for child in children:  # all at once: each one's end (and idle spell) starts now, not after the others'
            child.send("end")
        return [{key: [c[key] for c in calls[i]] for key in ("time", "faults", "user", "system")} | child.ask()
                for i, child in enumerate(children)]
    finally:
        for child in children:
            child.close()


def side_by_side(
    script: Path, workload: str, cases: list[Case], params: dict[str, Any], rounds: int, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """Every case of a workload, call by call in turn, for ``rounds`` rounds of fresh children; per-case medians."""
    params = dict(params)
    repeats = int(params["repeats"])
    per_case: dict[str, list[dict[str, Any]]] = {c.label: [] for c in cases}
    for r in range(rounds):
        for case, run in zip(cases, _round(script, workload, cases, params, repeats, first=r * repeats)):
            per_case[case.label].append(run)
    summary = {}
    for label, runs in per_case.items():
        med = statistics.median
        summary[label] = {
            "ms": med(med(run["time"]) for run in runs) * 1e3,
            "turn_ms": [t * 1e3 for run in runs for t in run["time"]],  # one call per turn, in turn order
            "user_ms": med(med(run["user"]) for run in runs) * 1e3,
            "sys_ms": med(med(run["system"]) for run in runs) * 1e3,
            "ms_min": min(min(run["time"]) for run in runs) * 1e3,
            "ms_max": max(max(run["time"]) for run in runs) * 1e3,
            "faults": med(med(run["faults"]) for run in runs),
            "peak_rss_mib": med(run["peak_rss"] for run in runs) / 2**20,
            "end_rss_mib": med(run["end_rss"] for run in runs) / 2**20,
            **({"idle_rss_mib": med(run["idle_rss"] for run in runs) / 2**20} if "idle_rss" in runs[0] else {}),
            "extra": {k: v for k, v in runs[-1].items()
                      if k not in ("time", "faults", "user", "system", "peak_rss", "end_rss", "idle_rss")},
        }
        log(f"  {workload:<28} {label:<22} {summary[label]['ms']:10.3f} ms  faults {summary[label]['faults']:>8.0f}")
    return summary


def versus_fastest(summary: dict[str, dict[str, Any]], label: str, peers: list[str]) -> Optional[tuple[float, float, float, str]]:
    """``label``'s time over the fastest of ``peers`` in each turn: (median, min, max, fastest overall)."""
    present = [p for p in peers if p in summary]
    if not present:
        return None
    turns = len(summary[label]["turn_ms"])
    ratios = [summary[label]["turn_ms"][t] / min(summary[p]["turn_ms"][t] for p in present) for t in range(turns)]
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
    _serve(script_arg, workload_arg, mode_arg, json.loads(params_arg))
