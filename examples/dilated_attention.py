"""A seed-style dilated attention module pooled with one decorator.

The module allocates zero-initialised output and scratch buffers on every
forward, as the modules in the seed's integration summary do. With
``@poolscope.pooled_forward`` those buffers come from the pool and go back by
themselves; ``enable_memory_pool=False`` (the seed's switch) runs it plain.

Run:  python examples/dilated_attention.py [--seq-len 16384]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import poolscope


class DilatedAttention(nn.Module):
    """Attention inside segments of ``segment`` tokens, every ``dilation``-th token taking part."""

    def __init__(self, segment: int = 2048, dilation: int = 4, enable_memory_pool: bool = True) -> None:
        super().__init__()
        self.segment = segment
        self.dilation = dilation
        self.enable_memory_pool = enable_memory_pool

    @poolscope.pooled_forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, length, heads, dim = q.shape
        s, r = self.segment, self.dilation
        out = torch.zeros_like(q)  # accumulator, as large as the input
        norm = torch.zeros(batch, length, heads, 1, dtype=q.dtype)  # per-token weights
        scratch = torch.empty(batch, heads, length // r, dim, dtype=q.dtype)  # gathered queries
        for offset in range(r):
            idx = slice(offset, None, r)
            qs = q[:, idx].view(batch, -1, s // r, heads, dim).transpose(2, 3)
            ks = k[:, idx].view(batch, -1, s // r, heads, dim).transpose(2, 3)
            vs = v[:, idx].view(batch, -1, s // r, heads, dim).transpose(2, 3)
            attended = F.scaled_dot_product_attention(qs, ks, vs)
            scratch.copy_(attended.transpose(2, 3).reshape(batch, -1, heads, dim).transpose(1, 2))
            out[:, idx] += scratch.transpose(1, 2)
            norm[:, idx] += 1
        return out.div_(norm)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.seq_len, 8, 64) for _ in range(3))
    pooled = DilatedAttention()
    plain = DilatedAttention(enable_memory_pool=False)
    with torch.no_grad():
        assert torch.equal(pooled(q, k, v), plain(q, k, v)), "pooled output differs from plain"
        # Interleave the two so that machine noise hits both alike.
        plain_ms, pooled_ms = [], []
        for _ in range(args.repeats):
            plain_ms.append(_median_ms(lambda: plain(q, k, v), 1))
            pooled_ms.append(_median_ms(lambda: pooled(q, k, v), 1))
        before = poolscope.get_pool("cpu").stats()
        pooled(q, k, v)
        after = poolscope.get_pool("cpu").stats()

    p, s = statistics.median(plain_ms), statistics.median(pooled_ms)
    print(f"sequence length {args.seq_len}, buffers {q.numel() * 4 / 2**20:.0f} MiB each")
    print(f"plain   forward: {p:8.1f} ms (median of {args.repeats})")
    print(f"pooled  forward: {s:8.1f} ms  -> {p / s:.2f}x")
    print("outputs bit-identical: yes")
    print(
        f"one pooled forward: {after.hits - before.hits} allocations served from cached blocks, "
        f"{after.misses - before.misses} new blocks, peak {after.peak_bytes_in_use / 2**20:.0f} MiB in use"
    )
    print(f"cpu pool now: {after}")


if __name__ == "__main__":
    main()
