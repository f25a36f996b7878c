"""The workload behind ``python -m poolscope``: long-sequence dilated attention, plain vs pooled.

Written the way hand-written-pool modules are: every forward allocates a
zero-initialised output accumulator and per-branch scratch buffers as large
as the input, then runs segment attention over dilated token subsets.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._scope import pool_scope

BRANCHES = ((256, 1), (512, 2), (1024, 4))  # (segment length, dilation), as in LongNet


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """LongNet-style attention: each branch attends inside segments over every r-th token."""
    batch, length, heads, dim = q.shape
    out = torch.zeros(batch, length, heads, dim, dtype=q.dtype, device=q.device)
    for segment, dilation in BRANCHES:
        segment = min(segment, length)
        picked = length // dilation
        scratch = torch.zeros(batch, picked, heads, dim, dtype=q.dtype, device=q.device)
        for offset in range(dilation):
            idx = slice(offset, None, dilation)

            def split(t: torch.Tensor) -> torch.Tensor:
                return t[:, idx].reshape(batch, -1, segment // dilation, heads, dim).transpose(2, 3)

            attended = F.scaled_dot_product_attention(split(q), split(k), split(v))
            scratch.copy_(attended.transpose(2, 3).reshape(batch, picked, heads, dim))
            out[:, idx] += scratch
    return out.div_(len(BRANCHES))


@dataclass(frozen=True)
class DemoResult:
    plain_ms: float
    pooled_ms: float
    identical: bool

    @property
    def speedup(self) -> float:
        return self.plain_ms / self.pooled_ms


def run_demo(
    seq_len: int,
    device: torch.device,
    threshold: int,
    repeats: int,
    profile: bool = False,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Time ``dilated_attention`` plain and inside a named scope, interleaved; medians."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, 8, 64, device=device, generator=generator) for _ in range(3))
    buffer_mib = q.numel() * q.element_size() / 2**20
    log(f"dilated attention, sequence {seq_len}, 8 heads x 64, {buffer_mib:.0f} MiB per buffer, on {device}")

    def pooled() -> torch.Tensor:
        with pool_scope(device, threshold=threshold, name="dilated_attention", enable_profiling=profile):
            return dilated_attention(q, k, v)

    plain_times: list[float] = []
    pooled_times: list[float] = []
    with torch.no_grad():
        identical = torch.equal(dilated_attention(q, k, v), pooled())
        for _ in range(repeats):
            for fn, times in ((lambda: dilated_attention(q, k, v), plain_times), (pooled, pooled_times)):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - start) * 1e3)
    return DemoResult(statistics.median(plain_times), statistics.median(pooled_times), identical)
