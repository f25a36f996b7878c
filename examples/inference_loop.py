"""An inference loop inside one pool scope: memory stays flat however many steps run.

Each step of this toy sliding-window generator allocates a zero-initialised
context buffer and a noise buffer (as large as the window) and drops them at
the end of the step. Inside ``with poolscope.pool_scope():`` the same blocks
serve every step: the pool's reserved bytes stay flat and no page is faulted in
again after the first step.

Run:  python examples/inference_loop.py [--steps 200]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn as nn

import poolscope


class SlidingWindowGenerator(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 256, window: int = 2048) -> None:
        super().__init__()
        self.window = window
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def step(self, tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        recent = tokens[:, -self.window :]
        context = torch.zeros(tokens.shape[0], self.window, self.embed.embedding_dim)
        context[:, -recent.shape[1] :] = self.embed(recent)
        noise = torch.randn(context.shape, generator=generator) * 1e-3
        hidden = torch.tanh(self.mix(context + noise)).mean(1)
        return self.head(hidden).argmax(-1, keepdim=True)


def generate(model: SlidingWindowGenerator, steps: int, pooled: bool) -> tuple[torch.Tensor, float, int]:
    tokens = torch.zeros(8, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    with torch.no_grad(), (poolscope.pool_scope(name="generate") if pooled else torch.no_grad()):
        for _ in range(steps):
            tokens = torch.cat([tokens, model.step(tokens, generator)], dim=1)
    elapsed = time.perf_counter() - start
    return tokens, elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SlidingWindowGenerator().eval()
    pool = poolscope.get_pool("cpu")
    plain_tokens, plain_s, plain_faults = generate(model, args.steps, pooled=False)
    pooled_tokens, pooled_s, pooled_faults = generate(model, args.steps, pooled=True)
    reserved_after_run = pool.stats().bytes_reserved
    generate(model, args.steps, pooled=True)  # a second run reuses the same blocks
    stats = pool.stats()
    print(f"{args.steps} steps, 8 sequences, a {model.window}-token window of 256 floats (16 MiB buffers)")
    print(f"plain : {plain_s * 1e3 / args.steps:6.2f} ms/step, {plain_faults} minor page faults")
    print(f"pooled: {pooled_s * 1e3 / args.steps:6.2f} ms/step, {pooled_faults} minor page faults")
    print(f"tokens identical: {torch.equal(plain_tokens, pooled_tokens)}")
    print(f"pool reserved after one run {reserved_after_run / 2**20:.0f} MiB, after two {stats.bytes_reserved / 2**20:.0f} MiB (flat)")
    print(f"pool: {stats.hits} hits, {stats.misses} misses, {stats.bytes_in_use} bytes still lent")
    print()
    print(poolscope.report())
    assert torch.equal(plain_tokens, pooled_tokens)
    assert stats.bytes_reserved == reserved_after_run and stats.bytes_in_use == 0


if __name__ == "__main__":
    main()
