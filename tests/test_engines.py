"""The suite against every engine poolscope ships: the native one (this run), and passthrough.

Under POOLSCOPE_ENGINE=passthrough, everything that checks results, arguments, scope semantics,
reports, decorators and documentation must pass unchanged; only tests marked ``pools`` (they
check what was pooled) do not apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import poolscope
from helpers import ROOT



def test_the_suite_passes_under_the_passthrough_engine():
    env = {**os.environ, "POOLSCOPE_ENGINE": "passthrough"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not pools and not soak and not opinfo_full",
         "--ignore", str(Path(__file__)), str(ROOT / "tests")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1])
    assert passed >= 150, summary


def test_engine_names_and_the_passthrough_engine_in_this_process():
    assert poolscope.engine() in ("native", "passthrough")
    from poolscope.engines import passthrough
    from poolscope.engines.base import PoolLimits, ScopeOptions

    engine = passthrough.ENGINE
    pool = engine.new_pool(torch.device("cpu"), PoolLimits())
    scope = engine.new_scope(pool, ScopeOptions(threshold=0))
    assert scope.exit() == "not_active"
    scope.enter()
    assert scope.stats().allocations_routed == 0 and pool.stats().bytes_in_use == 0
    assert scope.exit() == "ok"
