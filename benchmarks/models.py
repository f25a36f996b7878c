"""Models nobody here wrote: plain PyTorch against poolscope, and against the allocators users preload.

HF ``transformers`` Llama (forward at sequence 2048, ``generate()`` of 32 tokens), GPT-2,
BERT and a small Qwen2 (eager and under ``torch.compile``); ``diffusers``' ``UNet2DConditionModel``
in a 10-step DDIM loop; ``timm`` ViT-S/16 and ConvNeXt-T at batch 8; fkodom's
``dilated-attention-pytorch`` 0.2.0; and the LongNet encoder of ``examples/longnet.py``. Every model is built from a config
with random weights (nothing is downloaded) and runs under ``torch.no_grad()`` and
``torch.inference_mode()``. Columns: plain, poolscope (one ``pool_scope()`` around each call),
glibc's never-give-back tuning, jemalloc/mimalloc/tcmalloc preloads where installed. Outputs
are hashed in each child process; "identical" compares poolscope's bytes with plain's.

``dilated-attention-pytorch`` imports ``xformers`` (a CUDA library) for
``memory_efficient_attention``; ``_xformers_shim`` below maps it onto
``torch.nn.functional.scaled_dot_product_attention`` so that it runs on CPU.

Set-up and run: ``bash scripts/bench-models [--only llama] [--rounds 1]`` (an environment of its
own, .venv-models: timm needs torchvision, and torchvision a torch built with it).
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import types
from pathlib import Path
from typing import Any, Callable

import torch
from _harness import scope_for

ROOT = Path(__file__).resolve().parent.parent


def _digest(out: Any) -> str:
    h = hashlib.sha256()
    for t in out if isinstance(out, (list, tuple)) else [out]:
        t = t.detach().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()[:16]


def _step(mode: str, context: str, call: Callable[[], Any]) -> Callable[[], Any]:
    ctx = getattr(torch, context)
    scope = scope_for(mode)
    last: dict[str, Any] = {}

    def step() -> Any:
        with ctx(), scope():
            out = call()
        last["out"] = out
        return out

    # Hashed once, after the timed calls: hashing (and a bytes copy of a 250 MiB logits tensor)
    # inside the step would add time and page faults to every column.
    step.report = lambda: {"digest": _digest(last["out"])}  # type: ignore[attr-defined]
    return step


def _xformers_shim() -> None:
    """A stand-in ``xformers.ops`` whose attention is PyTorch's SDPA (same layout: B, S, H, D)."""
    if "xformers.ops" in sys.modules:
        return
    ops = types.ModuleType("xformers.ops")

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(query, key, value, op=None, attn_bias=None):  # type: ignore[no-untyped-def]
        out = torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            is_causal=isinstance(attn_bias, LowerTriangularMask),
        )
        return out.transpose(1, 2)

    ops.AttentionOp = Any  # type: ignore[attr-defined]
    ops.LowerTriangularMask = LowerTriangularMask  # type: ignore[attr-defined]
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    package = types.ModuleType("xformers")
    package.ops = ops  # type: ignore[attr-defined]
    sys.modules["xformers"], sys.modules["xformers.ops"] = package, ops


# --- models ----------------------------------------------------------------------------------------


def llama(mode: str, context: str, seq: int = 2048, layers: int = 4, hidden: int = 512) -> Callable[[], Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max(seq, 4096),
                         vocab_size=32000, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32000, (1, seq))
    return _step(mode, context, lambda: model(ids).logits)


def llama_generate(mode: str, context: str, prompt: int = 512, tokens: int = 32, layers: int = 4, hidden: int = 512) -> Callable[[], Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=32000, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 32000, (1, prompt))
    return _step(mode, context, lambda: model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                                       do_sample=False, pad_token_id=0))


def gpt2(mode: str, context: str, seq: int = 1024, layers: int = 6) -> Callable[[], Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_positions=max(seq, 1024), attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 50257, (1, seq))
    return _step(mode, context, lambda: model(ids).logits)


def bert(mode: str, context: str, seq: int = 512, batch: int = 8, layers: int = 6) -> Callable[[], Any]:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=layers, max_position_embeddings=max(seq, 512),
                                 attn_implementation="sdpa")).eval()
    ids = torch.randint(0, 30522, (batch, seq))
    return _step(mode, context, lambda: model(ids).last_hidden_state)


def qwen2(mode: str, context: str, seq: int = 2048, layers: int = 4, hidden: int = 512, compiled: bool = False) -> Callable[[], Any]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=max(seq, 4096), attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 32000, (1, seq))
    if compiled:
        model = torch.compile(model)
        with getattr(torch, context)():
            model(ids)  # the compile happens here, outside any scope, as in a user's warm-up
    return _step(mode, context, lambda: model(ids).logits)


def qwen2_compiled(mode: str, context: str, **params: Any) -> Callable[[], Any]:
    return qwen2(mode, context, compiled=True, **params)


def unet_ddim(mode: str, context: str, steps: int = 10, batch: int = 2, latent: int = 64, width: int = 32) -> Callable[[], Any]:
    """A whole denoising loop per call: ``steps`` U-Net calls and DDIM updates on one latent."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(width, width * 2, width * 4), norm_num_groups=min(16, width),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=width * 4, attention_head_dim=8,
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    text = torch.randn(batch, 77, width * 4)
    start = torch.randn(batch, 4, latent, latent)

    def denoise() -> torch.Tensor:
        scheduler.set_timesteps(steps)
        latents = start
        for t in scheduler.timesteps:
            noise = unet(latents, t, encoder_hidden_states=text).sample
            latents = scheduler.step(noise, t, latents).prev_sample
        return latents

    return _step(mode, context, denoise)


def _timm(name: str, mode: str, context: str, batch: int, size: int) -> Callable[[], Any]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x = torch.randn(batch, 3, size, size)
    return _step(mode, context, lambda: model(x))


def vit_small(mode: str, context: str, batch: int = 8) -> Callable[[], Any]:
    return _timm("vit_small_patch16_224", mode, context, batch, 224)


def convnext_tiny(mode: str, context: str, batch: int = 8) -> Callable[[], Any]:
    return _timm("convnext_tiny", mode, context, batch, 224)


def fkodom_dilated(mode: str, context: str, seq: int = 16384, dim: int = 512) -> Callable[[], Any]:
    _xformers_shim()
    from dilated_attention_pytorch.dilated_attention import MultiheadDilatedAttention

    torch.manual_seed(0)
    attn = MultiheadDilatedAttention(dim, 8, dilation_rates=[1, 2, 4], segment_lengths=[2048, 4096, 8192]).eval()
    x = torch.randn(1, seq, dim)
    return _step(mode, context, lambda: attn(x, x, x)[0])


def longnet_example(mode: str, context: str, seq: int = 16384) -> Callable[[], Any]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("longnet_example", ROOT / "examples" / "longnet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.LongNetEncoder().eval()
    module.set_memory_pool(model, False)  # the comparison decides where scopes go
    x = torch.randn(1, seq, 192)
    return _step(mode, context, lambda: model(x))


MODELS = {  # row name: (function, parameters, smoke parameters)
    "HF Llama forward (seq 2048)": ("llama", {}, {"seq": 128, "layers": 1, "hidden": 64}),
    "HF Llama generate() 32 tokens": ("llama_generate", {}, {"prompt": 16, "tokens": 2, "layers": 1, "hidden": 64}),
    "HF GPT-2 forward (seq 1024)": ("gpt2", {}, {"seq": 64, "layers": 1}),
    "HF BERT forward (8 x 512)": ("bert", {}, {"seq": 32, "batch": 2, "layers": 1}),
    "HF Qwen2 forward (seq 2048)": ("qwen2", {}, {"seq": 64, "layers": 1, "hidden": 64}),
    "HF Qwen2 forward (seq 2048), torch.compile": ("qwen2_compiled", {}, {"seq": 64, "layers": 1, "hidden": 64}),
    "diffusers U-Net, 10-step DDIM loop (2 x 4 x 64 x 64)": ("unet_ddim", {}, {"steps": 2, "latent": 16, "width": 16}),
    "timm ViT-S/16 (batch 8)": ("vit_small", {}, {"batch": 1}),
    "timm ConvNeXt-T (batch 8)": ("convnext_tiny", {}, {"batch": 1}),
    "fkodom dilated attention (seq 16k)": ("fkodom_dilated", {}, {"seq": 8192, "dim": 64}),
    "examples' LongNet encoder (seq 16k)": ("longnet_example", {}, {"seq": 2048}),
}


def plot(results: dict[str, dict[str, Any]], path: Path) -> bool:
    """Time of each allocator relative to plain PyTorch, per model (lower is faster)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    labels = [k for k in next(iter(results.values())) if k != "plain"]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) * len(labels) / 2 + 1.5))
    height = 0.8 / len(labels)
    peer_colors = iter(["tab:blue", "tab:orange", "tab:purple", "tab:red", "tab:brown", "tab:gray"])
    for i, label in enumerate(labels):
        ratios = [results[n][label]["ms"] / results[n]["plain"]["ms"] for n in names]
        ax.barh([y + i * height for y in range(len(names))], ratios, height,
                label=label, color="tab:green" if label == "poolscope" else next(peer_colors))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(names))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time per call / plain PyTorch's (median; lower is faster)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def against_the_others(results: dict[str, dict[str, Any]], setups: list[str]) -> str:
    """Each setup's time over the fastest of the other setups, per turn, as poolscope's is reported.

    The control for "vs fastest peer": the fastest of several setups in a turn is the luckiest
    of several noisy draws, so even the fastest allocator scores above 1.00x this way.
    """
    from _harness import markdown

    if len(setups) < 2:
        return "(no other setup to compare with)"
    rows = []
    for setup in setups:
        per_row = []
        for r in results.values():
            others = [o for o in setups if o != setup and o in r]
            turns = len(r[setup]["turn_ms"])
            per_row.append(statistics.median(r[setup]["turn_ms"][t] / min(r[o]["turn_ms"][t] for o in others)
                                             for t in range(turns)))
        rows.append([setup, f"{statistics.median(per_row):.3f}x", f"{sum(x <= 1.0 for x in per_row)} of {len(per_row)}",
                     f"{sum(x <= 1.05 for x in per_row)} of {len(per_row)}", f"{max(per_row):.2f}x"])
    return markdown(["setup", "median over rows", "rows at or below 1.00x", "rows at or below 1.05x", "worst row"], rows)


def main() -> int:
    from _harness import Case, arguments, machine, markdown, peers, side_by_side, versus_fastest, write_json

    parser = arguments(__doc__, rounds=1, repeats=5)
    parser.add_argument("--contexts", default="no_grad,inference_mode")
    parser.add_argument("--also-threshold", metavar="BYTES",
                        help="a second poolscope column with this POOLSCOPE_THRESHOLD (e.g. 256KiB): "
                             "measures another default on every workload in the same run")
    parser.add_argument("--idle-s", type=float, default=0.0,
                        help="also measure RSS this many seconds after the last call (poolscope releases by time "
                             "after release_idle_s, 10 s by default; some peers never do)")
    parser.add_argument("--from-json", type=Path, help="draw the plot of an earlier run's results")
    args = parser.parse_args()
    if args.from_json:
        import json

        earlier = json.loads(args.from_json.read_text())["results"]
        present = [k for k in ("poolscope", "glibc", "jemalloc", "mimalloc", "tcmalloc") if k in next(iter(earlier.values()))]
        print(against_the_others(earlier, present) + "\n")
        picture = args.from_json.with_suffix(".png")
        print(f"plot: {picture}" if plot(json.loads(args.from_json.read_text())["results"], picture) else "no plot: matplotlib missing")
        return 0
    envs, missing = peers()
    # --idle-s measures what is released by time: poolscope keeps its default release_idle_s then
    # (the harness otherwise ignores waits between calls; a wait over 10 s would release the cache).
    by_time = {"POOLSCOPE_RELEASE_IDLE_S": "10"} if args.idle_s > 0 else {}
    cases = [Case(name, "plain", env) for name, env in envs.items()] + [Case("poolscope", "pooled", by_time)]
    variant = f"poolscope {args.also_threshold}" if args.also_threshold else None
    if variant:
        cases.append(Case(variant, "pooled", {"POOLSCOPE_THRESHOLD": args.also_threshold, **by_time}))
    rounds, repeats = (1, 1) if args.smoke else (args.rounds, args.repeats)
    results: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for row, (fn, params, smoke) in MODELS.items():
        if args.only and args.only.lower() not in row.lower():
            continue
        for context in args.contexts.split(","):
            p = {**params, **(smoke if args.smoke else {}), "context": context, "repeats": repeats, "warmup": 1}
            if args.idle_s > 0:
                p["idle_s"] = args.idle_s
            try:
                results[f"{row}, {context}"] = side_by_side(Path(__file__), fn, cases, p, rounds)
            except RuntimeError as exc:  # a model library missing here: say so, go on
                skipped.append(f"{row}: {str(exc).strip().splitlines()[-1]}")
                break
    print(f"\nmachine: {machine()}; {rounds} round(s) x {repeats} calls, medians")
    print(f"missing peers: {'; '.join(missing) or 'none'}; skipped: {'; '.join(skipped) or 'none'}\n")
    peer_names = [c.label for c in cases if c.label not in ("plain", "poolscope", variant)]
    header = ["workload", "plain ms", "poolscope ms", "speedup", *[f"{p} ms" for p in peer_names],
              "poolscope vs fastest peer (median [min-max] of turns)",
              *([f"{variant} ms", f"{variant} vs fastest peer", f"{variant} faults"] if variant else []),
              "CPU user / sys ms plain", "poolscope", "fastest peer",
              "faults plain / poolscope", "peak RSS MiB plain / poolscope", "end RSS MiB plain / poolscope / fastest peer",
              *([f"RSS MiB after {args.idle_s:g} s idle plain / poolscope / fastest peer"] if args.idle_s > 0 else []),
              "identical"]
    rows = []
    for name, r in results.items():
        plain, pooled = r["plain"], r["poolscope"]
        same = plain["extra"].get("digest") == pooled["extra"].get("digest")
        versus = versus_fastest(r, "poolscope", peer_names)
        fastest = r[versus[3]] if versus else None

        def cpu(x: dict[str, Any]) -> str:
            return f"{x['user_ms']:.0f} / {x['sys_ms']:.0f}"

        def variant_cells(x: dict[str, Any], v: Any) -> list[str]:
            same_bits = "" if x["extra"].get("digest") == plain["extra"].get("digest") else " NOT IDENTICAL"
            return [f"{x['ms']:.1f}{same_bits}", f"{v[0]:.2f}x [{v[1]:.2f}-{v[2]:.2f}]" if v else "-", f"{x['faults']:.0f}"]

        rows.append([
            name, f"{plain['ms']:.1f}", f"{pooled['ms']:.1f}", f"{plain['ms'] / pooled['ms']:.2f}x",
            *[f"{r[p]['ms']:.1f}" for p in peer_names],
            f"{versus[0]:.2f}x [{versus[1]:.2f}-{versus[2]:.2f}] ({versus[3]})" if versus else "-",
            *(variant_cells(r[variant], versus_fastest(r, variant, peer_names)) if variant else []),
            cpu(plain), cpu(pooled), f"{cpu(fastest)} ({versus[3]})" if versus and fastest else "-",
            f"{plain['faults']:.0f} / {pooled['faults']:.0f}",
            f"{plain['peak_rss_mib']:.0f} / {pooled['peak_rss_mib']:.0f}",
            f"{plain['end_rss_mib']:.0f} / {pooled['end_rss_mib']:.0f} / " + (f"{fastest['end_rss_mib']:.0f}" if fastest else "-"),
            *([f"{plain['idle_rss_mib']:.0f} / {pooled['idle_rss_mib']:.0f} / " + (f"{fastest['idle_rss_mib']:.0f}" if fastest else "-")]
              if args.idle_s > 0 else []),
            "yes" if same else "NO",
        ])
    print(markdown(header, rows))
    if results and rounds * repeats > 0:
        print("\nEach setup against the fastest of the others, turn by turn (the control for the column above):\n")
        print(against_the_others(results, ["poolscope", *peer_names]))
    out = write_json(args.out, "models-smoke.json" if args.smoke else "models.json",
                     {"machine": machine(), "rounds": rounds, "missing": missing, "skipped": skipped, "results": results})
    picture = args.out / ("models-smoke.png" if args.smoke else "models.png")
    print(f"\nresults: {out}" + (f"; plot: {picture}" if plot(results, picture) else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
