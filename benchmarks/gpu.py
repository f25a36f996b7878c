"""CUDA: what a scope costs where PyTorch's caching allocator already caches, and what it saves.

- a launch-bound decode loop (small layers, one token at a time, KV cache): overhead vs plain,
  target <= 1.03x;
- attention (L=8192) and the LongNet encoder of examples/longnet.py (L=32768): time vs plain;
- fragmentation: long-lived tensors (a growing cache) interleaved with large transient ones;
  peak reserved bytes plain, with the transients in a scope (their own pool), and plain with
  ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``; target: the scope below both.

Outputs are hashed and compared with plain. Cases run in child processes, side by side
(``_harness.py``). Without a CUDA device it says so and exits 0 (``--smoke`` in CI).

Run:  python benchmarks/gpu.py [--rounds 3] [--out benchmarks/results]
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
from _harness import MiB, scope_for


def _module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(mode: str, call: Callable[[], Any]) -> Callable[[], Any]:
    scope = scope_for(mode)
    last: dict[str, Any] = {}

    def step() -> Any:
        with scope("cuda") if mode == "pooled" else scope():
            out = call()
        torch.cuda.synchronize()
        last["digest"] = hashlib.sha256(out.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]
        last["max_reserved_mib"] = torch.cuda.max_memory_reserved() / MiB
        return out

    step.report = lambda: dict(last)  # type: ignore[attr-defined]
    return step


def decode(mode: str, tokens: int = 64, prompt: int = 512, d: int = 256) -> Callable[[], Any]:
    engine = _module(Path(__file__).with_name("allocation.py"), "allocation_workloads")
    return _timed(mode, engine.decode_body(tokens, prompt, d, 2, device="cuda"))


def attention(mode: str, length: int = 8192) -> Callable[[], Any]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 16, length, 64, device="cuda") for _ in range(3))

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return ((q @ k.transpose(-1, -2)) * 0.125).softmax(-1) @ v

    return _timed(mode, call)


def longnet(mode: str, seq: int = 32768) -> Callable[[], Any]:
    example = _module(ROOT / "examples" / "longnet.py", "longnet_example")
    torch.manual_seed(0)
    model = example.LongNetEncoder().cuda().eval()
    example.set_memory_pool(model, False)
    x = torch.randn(1, seq, 192, device="cuda")

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return _timed(mode, call)


def fragmentation(mode: str, steps: int = 64, keep_mib: int = 8, transient_mib: int = 200) -> Callable[[], Any]:
    """Each step keeps a small tensor for good and uses two large transient ones."""

    def call() -> torch.Tensor:
        torch.manual_seed(0)
        kept = []
        for i in range(steps):
            kept.append(torch.randn(keep_mib * MiB // 4 + i * 1024, device="cuda"))  # long-lived, growing sizes
            if mode == "pooled":
                import poolscope

                with poolscope.pool_scope("cuda"):
                    t = torch.randn(transient_mib * MiB // 4 + i * 4096, device="cuda")
                    u = (t * 2).sum()
            else:
                t = torch.randn(transient_mib * MiB // 4 + i * 4096, device="cuda")
                u = (t * 2).sum()
            kept[-1][0] = u
            del t
        return torch.stack([k[0] for k in kept])

    step = _timed("plain", call)  # the scope is inside, around the transients only
    return step


WORKLOADS = {  # name: (function, params, smoke params, modes as (label, mode, env))
    "decode loop, launch-bound (64 tokens)": ("decode", {}, {"tokens": 2}, None),
    "attention L=8192": ("attention", {}, {"length": 256}, None),
    "LongNet encoder L=32768": ("longnet", {}, {"seq": 2048}, None),
    "fragmentation: long-lived + transient": ("fragmentation", {}, {"steps": 2, "transient_mib": 4}, "fragmentation"),
}


def main() -> int:
    from _harness import Case, arguments, machine, markdown, side_by_side, write_json

    args = arguments(__doc__, rounds=3, repeats=10, only=False).parse_args()
    if not torch.cuda.is_available():
        print("| workload | result |\n| --- | --- |\n| all | skipped: no CUDA device on this machine |")
        write_json(args.out, "gpu-smoke.json" if args.smoke else "gpu.json", {"machine": machine(), "skipped": "no CUDA device"})
        return 0
    rounds, repeats = (1, 2) if args.smoke else (args.rounds, args.repeats)
    results: dict[str, Any] = {}
    for name, (fn, params, smoke, kind) in WORKLOADS.items():
        if kind == "fragmentation":
            cases = [Case("plain", "plain"), Case("poolscope", "pooled"),
                     Case("expandable_segments", "plain", {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})]
        else:
            cases = [Case("plain", "plain"), Case("poolscope", "pooled")]
        p = {**params, **(smoke if args.smoke else {}), "repeats": repeats, "warmup": 2}
        results[name] = side_by_side(Path(__file__), fn, cases, p, rounds)
    rows = []
    for name, r in results.items():
        plain, pooled = r["plain"], r["poolscope"]
        same = plain["extra"].get("digest") == pooled["extra"].get("digest")
        row = [name, f"{plain['ms']:.2f}", f"{pooled['ms']:.2f}", f"{pooled['ms'] / plain['ms']:.3f}x",
               f"{plain['extra'].get('max_reserved_mib', 0):.0f}", f"{pooled['extra'].get('max_reserved_mib', 0):.0f}",
               f"{r['expandable_segments']['extra'].get('max_reserved_mib', 0):.0f}" if "expandable_segments" in r else "-",
               "yes" if same else "NO"]
        rows.append(row)
    header = ["workload", "plain ms", "poolscope ms", "ratio", "peak reserved MiB plain", "poolscope",
              "expandable_segments", "identical"]
    print(f"\nmachine: {machine()}, {torch.cuda.get_device_name()}; {rounds} rounds x {repeats}, medians\n")
    print(markdown(header, rows))
    write_json(args.out, "gpu-smoke.json" if args.smoke else "gpu.json",
               {"machine": machine(), "gpu": torch.cuda.get_device_name(), "results": results, "table": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
