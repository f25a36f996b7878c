"""Dilated attention, multi-head dilated attention and a small LongNet-style encoder, pooled.

The six modules of the seed's integration summary each grew an
``enable_memory_pool`` flag plus hand-written ``_allocate_tensor`` and
``_deallocate_tensor`` methods. Here each module keeps the flag (so callers
can still switch pooling off per instance) and replaces the rest with one
decorator. Every forward allocates zero-initialised accumulators as large as
its input, as the seed's modules do; those come from the pool.

Run:  python examples/longnet.py [--seq-len 8192] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import poolscope

BRANCHES = ((256, 1), (512, 2), (1024, 4))  # (segment length, dilation) per head group


class DilatedAttention(nn.Module):
    """Attention inside segments of ``segment`` tokens, over every ``dilation``-th token."""

    def __init__(self, segment: int, dilation: int, enable_memory_pool: bool = True) -> None:
        super().__init__()
        self.segment, self.dilation = segment, dilation
        self.enable_memory_pool = enable_memory_pool

    @poolscope.pooled_forward
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, length, heads, dim = q.shape  # (B, L, H, D)
        s, r = min(self.segment, length), self.dilation
        out = torch.zeros_like(q)
        for offset in range(r):
            idx = slice(offset, None, r)

            def segments(t: torch.Tensor) -> torch.Tensor:
                return t[:, idx].reshape(batch, -1, s // r, heads, dim).transpose(2, 3)

            attended = F.scaled_dot_product_attention(segments(q), segments(k), segments(v))
            out[:, idx] = attended.transpose(2, 3).reshape(batch, -1, heads, dim)
        return out


class MultiheadDilatedAttention(nn.Module):
    """LongNet's multi-head dilated attention: each head group attends with its own segment and dilation."""

    def __init__(self, dim: int, heads: int, enable_memory_pool: bool = True) -> None:
        super().__init__()
        assert heads % len(BRANCHES) == 0, "heads must split evenly across the branches"
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.branches = nn.ModuleList(DilatedAttention(s, r, enable_memory_pool) for s, r in BRANCHES)
        self.enable_memory_pool = enable_memory_pool

    @poolscope.pooled_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, self.head_dim).unbind(2)
        out = torch.empty(batch, length, self.heads, self.head_dim)
        group = self.heads // len(self.branches)
        for i, branch in enumerate(self.branches):
            heads = slice(i * group, (i + 1) * group)
            out[:, :, heads] = branch(q[:, :, heads], k[:, :, heads], v[:, :, heads])
        return self.proj(out.view(batch, length, -1))


class LongNetEncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, enable_memory_pool: bool = True) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiheadDilatedAttention(dim, heads, enable_memory_pool)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.enable_memory_pool = enable_memory_pool

    @poolscope.pooled_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class LongNetEncoder(nn.Module):
    def __init__(self, dim: int = 192, heads: int = 6, layers: int = 2, enable_memory_pool: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LongNetEncoderLayer(dim, heads, enable_memory_pool) for _ in range(layers))
        self.enable_memory_pool = enable_memory_pool

    @poolscope.pooled_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def set_memory_pool(module: nn.Module, enabled: bool) -> None:
    """The seed's per-instance switch, applied to a module and everything inside it."""
    for m in module.modules():
        if hasattr(m, "enable_memory_pool"):
            m.enable_memory_pool = enabled


def _compare(name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int) -> None:
    times: dict[bool, list[float]] = {True: [], False: []}
    outputs = {}
    with torch.no_grad():
        for _ in range(repeats):
            for pooled in (False, True):
                set_memory_pool(module, pooled)
                start = time.perf_counter()
                outputs[pooled] = module(*inputs)
                times[pooled].append((time.perf_counter() - start) * 1e3)
    plain, pooled = statistics.median(times[False]), statistics.median(times[True])
    same = torch.equal(outputs[False], outputs[True])
    print(f"{name:28s} plain {plain:7.1f} ms  pooled {pooled:7.1f} ms  {plain / pooled:4.2f}x  bit-identical: {same}")
    assert same, f"{name}: pooled output differs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192, help="a multiple of 1024")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    length, dim, heads = args.seq_len, 192, 6
    x = torch.randn(1, length, dim)
    q, k, v = (torch.randn(1, length, 2, dim // heads) for _ in range(3))
    print(f"sequence {length}, model width {dim}, {heads} heads; medians of {args.repeats}")
    _compare("DilatedAttention", DilatedAttention(512, 2), (q, k, v), args.repeats)
    _compare("MultiheadDilatedAttention", MultiheadDilatedAttention(dim, heads), (x,), args.repeats)
    _compare("LongNetEncoder (2 layers)", LongNetEncoder(dim, heads), (x,), args.repeats)
    print()
    print(poolscope.report())
    print()
    print(poolscope.get_pool("cpu").stats())


if __name__ == "__main__":
    main()
