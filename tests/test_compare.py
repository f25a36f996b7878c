"""``poolscope.compare`` and ``python -m poolscope compare``: a verdict that tells the truth.

Times are not asserted where the margin is thin: the verdict's logic is checked on given
figures, and the measured runs are checked by what does not depend on the machine's speed
(faults, what was pooled, identity), except a call that page faults 96 MiB each time plainly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import poolscope
from conftest import ENGINE
from poolscope._compare import _verdict

MiB = 1 << 20
BANDS = ("below 64 KiB", "64 KiB to 1.0 MiB", "1.0 MiB and up")
native_only = pytest.mark.skipif(ENGINE != "native", reason="measures what the native engine pools")


def verdict(ratios, *, routed=10.0, faults=(5000.0, 0.0), bands=(0, 0, 100 * MiB), share=0.3, identical=True):
    return _verdict(
        identical=identical, ratios=ratios, routed=routed, faults_plain=faults[0], faults_pooled=faults[1],
        bands=dict(zip(BANDS, bands)), threshold=MiB, allocation_share=share,
    )


def test_the_verdict_on_given_figures():
    assert verdict([1.3, 1.2, 1.25, 1.4]).startswith("faster: 1.27x, page faults per call 5000 plain, 0 pooled")
    # Faster in the median but not in most rounds: noise, not a win.
    assert verdict([1.3, 0.9, 1.2, 0.95]).startswith("no measurable difference")
    assert verdict([0.8, 0.85, 0.9, 0.8], share=0.01).startswith("slower: 0.82x")
    assert "compute-bound: page faults are about 1% of its time" in verdict([1.0, 1.01, 0.99], share=0.01)
    below = verdict([1.0, 1.01, 0.99], bands=(30 * MiB, 60 * MiB, 10 * MiB))
    assert "90% of the bytes it allocates fall below the 1.0 MiB threshold" in below
    nothing = verdict([0.9, 0.95], routed=0, bands=(2 * MiB, 40 * MiB, 0))
    assert nothing.startswith("no win: nothing was pooled: all 42.0 MiB it allocates per call come in pieces below")
    assert verdict([0.9], routed=0, bands=(0, 0, 0)).startswith("no win: the call allocates no CPU memory")
    assert verdict([1.5], identical=False).startswith("outputs differ")


@native_only
def test_an_allocation_heavy_call_shows_its_win():
    def scratch():  # 96 MiB: past glibc's largest mmap threshold, so plain faults every page, every call
        return torch.zeros(24 * MiB).add_(1).sum()

    result = poolscope.compare(scratch, calls=5, warmup=1)
    assert result.identical
    assert result.faults_plain >= 20000 and result.faults_pooled <= 0.05 * result.faults_plain
    assert result.routed_per_call == 1 and result.hit_rate == 1.0
    assert result.bytes_by_band["1.0 MiB and up"] == 96 * MiB
    assert result.speedup > 1 and result.verdict.startswith("faster")
    text = str(result)
    assert "page faults per call" in text and "verdict: faster" in text


@native_only
def test_a_call_of_small_tensors_says_nothing_was_pooled():
    def small(x):
        for _ in range(20):
            x = x + 1
        return x

    result = poolscope.compare(small, torch.zeros(64 * 1024), calls=3, warmup=0)  # 256 KiB tensors
    assert result.routed_per_call == 0 and result.identical
    assert result.bytes_by_band["64 KiB to 1.0 MiB"] >= 20 * 256 * 1024
    assert result.verdict.startswith("no win: nothing was pooled")
    lowered = poolscope.compare(small, torch.zeros(64 * 1024), calls=3, warmup=0, scope_kwargs={"threshold": "256KiB"})
    assert lowered.routed_per_call == 20


def test_outputs_that_differ_are_reported():
    state = {"n": 0}

    def counter():
        state["n"] += 1
        return torch.tensor([state["n"]])

    result = poolscope.compare(counter, calls=3, warmup=0)
    assert not result.identical and result.verdict.startswith("outputs differ")


def test_random_calls_are_compared_from_the_same_rng_state():
    assert poolscope.compare(lambda: torch.randn(MiB), calls=3, warmup=0).identical


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"calls": 0}, ValueError, r"calls must be an int >= 1; got 0"),
        ({"warmup": -1}, ValueError, r"warmup must be an int >= 0; got -1"),
        ({"context": "train"}, ValueError, r"context must be one of \('inference_mode', 'no_grad', 'grad'\); got 'train'"),
        ({"budget_s": 0}, ValueError, r"budget_s must be a number of seconds > 0; got 0"),
        ({"scope_kwargs": {"threshold": -1}}, ValueError, r"threshold must be >= 0 bytes"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match) as raised:
        poolscope.compare(lambda: None, **kwargs)
    assert isinstance(raised.value, poolscope.PoolscopeError)
    with pytest.raises(poolscope.PoolscopeTypeError, match=r"compare needs a callable to measure; got 3"):
        poolscope.compare(3)


def test_the_command_line_measures_a_file_of_the_users(tmp_path):
    (tmp_path / "mine.py").write_text(textwrap.dedent("""
        import torch
        model = torch.nn.Linear(1024, 1024)
        x = torch.randn(512, 1024)
        def run():
            return model(x)
    """))
    out = subprocess.run(
        [sys.executable, "-m", "poolscope", "compare", "mine.py:run", "--calls", "3", "--warmup", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "outputs bit-identical: yes" in out.stdout and "verdict: " in out.stdout
    bad = subprocess.run([sys.executable, "-m", "poolscope", "compare", "mine.py"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert bad.returncode == 2 and "expected MODULE:CALLABLE" in bad.stderr
