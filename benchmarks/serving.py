"""Serving traffic: request streams of varying shapes, with pauses, per allocator setup.

Two servers, each a stream of requests drawn from a fixed seed (every setup serves the same
requests in the same order):

* ``embedding``: HF ``BertModel`` (hidden 384, 6 layers, 6 heads), batch 1-32 x sequence 16-512;
* ``chat``: HF ``Qwen2ForCausalLM`` (4 layers, hidden 512), prompts of 32-1536 tokens,
  ``generate()`` of 16 tokens (greedy).

Setups, each a child process of its own, all alive at once (as ``benchmarks/models.py``): plain
PyTorch, poolscope with its defaults (one ``pool_scope()`` around each request; the clocks learn),
glibc told never to give memory back, and jemalloc, mimalloc and tcmalloc preloaded where
installed; ``--setups`` may add poolscope at another threshold (``poolscope@256KiB``: the faults
per request by size band come from these) or over a preloaded peer (``poolscope+tcmalloc``).
``--gap`` seconds separate two requests *of the same setup*, measured from the end of one to the
start of the next: the parent schedules every setup by its own clock, so a setup sees
the gap it was given, not the other setups' turns (the actual gaps are reported). Gap 0 is served
in bursts of ``--burst`` back-to-back requests per turn; the first request of each burst waited
for the others and is left out of the per-request figures. ``--threads 2`` serves two requests
at once on two threads of each child.

Per request: time, minor page faults and RSS after it, outputs hashed and compared with plain's.
Per setup: medians after ``--warmup`` requests, time over the fastest peer request by request,
the largest RSS in each tenth of the stream (growth over the second half is its peak there over
its first tenth there; for poolscope also RSS less the pool's resident pages, read with
``mincore``, which tells the pool's growth from the rest of the process's), and RSS ``--idle``
seconds after the last request (all setups idle at once). poolscope's own figures say what its
retention did (releases by time, by exits, refaults, the clocks it learned). An SVG of RSS over
the stream goes next to the JSON.

Run (in the models environment, which ``bash scripts/bench-models --setup-only`` makes):
    .venv-models/bin/python benchmarks/serving.py --workload embedding --gap 15 --requests 40
    python benchmarks/serving.py --smoke      # a tiny encoder: checks that it runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _harness import ChildProcess, machine, markdown, peers, reply, usage, write_json  # noqa: E402

PEERS = ("plain", "glibc", "jemalloc", "mimalloc", "tcmalloc")


# --- the child: one setup's server ----------------------------------------------------------------


def shapes(workload: str, count: int, seed: int, smoke: bool) -> list[tuple[int, int]]:
    """The stream: (batch, sequence) for embedding, (1, prompt tokens) for chat."""
    rng = random.Random(seed)
    if workload == "embedding":
        top_batch, top_seq = (4, 64) if smoke else (32, 512)
        return [(rng.randint(1, top_batch), rng.randint(16, top_seq)) for _ in range(count)]
    top_prompt = 96 if smoke else 1536
    return [(1, rng.randint(32, top_prompt)) for _ in range(count)]


def build(workload: str, smoke: bool) -> Callable[[int, int, int], Any]:
    """A request handler: (batch, sequence, request index) -> output tensor."""
    import torch

    torch.manual_seed(0)
    if smoke:  # no transformers needed: a small torch encoder
        layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        embed = torch.nn.Embedding(1000, 64)

        def smoke_request(batch: int, seq: int, index: int) -> Any:
            ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(index))
            return model(embed(ids)).mean(dim=1)

        return smoke_request
    if workload == "embedding":
        from transformers import BertConfig, BertModel

        bert = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                                    intermediate_size=1536, attn_implementation="sdpa")).eval()

        def embedding_request(batch: int, seq: int, index: int) -> Any:
            ids = torch.randint(0, 30522, (batch, seq), generator=torch.Generator().manual_seed(index))
            return bert(ids).last_hidden_state.mean(dim=1)

        return embedding_request
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=512, intermediate_size=512 * 11 // 4, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=8, vocab_size=32000,
                                        max_position_embeddings=4096, attn_implementation="sdpa")).eval()

    def chat_request(batch: int, seq: int, index: int) -> Any:
        ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(index))
        return qwen.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                             do_sample=False, pad_token_id=0)

    return chat_request


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


def _resident(segments: list[dict[str, Any]]) -> int:
    """Bytes of these segments resident in RAM (``mincore``): the pool's share of RSS, so that
    what RSS gains outside the pool shows apart from pages the pool faulted back in."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    page = mmap.PAGESIZE
    total = 0
    for segment in segments:
        start = segment["address"] // page * page
        end = -(-(segment["address"] + segment["total_size"]) // page) * page
        vec = ctypes.create_string_buffer((end - start) // page)
        if libc.mincore(start, end - start, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed on a pool segment")
        total += sum(b & 1 for b in vec.raw) * page
    return total


def _digest(out: Any) -> str:
    import torch

    t = out.detach().contiguous().view(-1)
    data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(str((t.dtype, tuple(out.shape))).encode() + data).hexdigest()[:16]


def child(workload: str, mode: str, count: int, seed: int, smoke: bool) -> None:
    import contextlib

    import torch

    stream = shapes(workload, count, seed, smoke)
    handler = build(workload, smoke)
    scope: Callable[[], Any] = contextlib.nullcontext
    pool = None
    if mode == "poolscope":
        import poolscope

        scope, pool = poolscope.pool_scope, poolscope.get_pool("cpu")

    def serve(index: int) -> dict[str, Any]:
        batch, seq = stream[index]
        misses = pool.stats().misses if pool is not None else 0
        (f0, _, _), t0 = usage(), time.perf_counter()
        with torch.inference_mode(), scope():
            out = handler(batch, seq, index)
        elapsed = time.perf_counter() - t0
        faults = usage()[0] - f0
        misses = pool.stats().misses - misses if pool is not None else 0  # segments the pool grew by
        return {"index": index, "time": elapsed, "faults": faults, "misses": misses, "digest": _digest(out)}

    with torch.inference_mode(), scope():  # build what the first call builds: not part of the stream
        handler(1, 16, -1)
    reply({"ready": True})
    for line in sys.stdin:
        words = line.split()
        if words[0] == "serve":  # serve I [J...]: one request per index, each on a thread of its own
            started = time.monotonic()
            indices = [int(w) for w in words[1:]]
            if len(indices) == 1:
                replies = [serve(indices[0])]
            else:
                replies = [{}] * len(indices)

                def run(slot: int, index: int) -> None:
                    replies[slot] = serve(index)

                threads = [threading.Thread(target=run, args=(k, i)) for k, i in enumerate(indices)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            wall = time.monotonic() - started
            pool_rss = _resident(pool.segments()) if pool is not None else None
            reply({"replies": replies, "wall": wall, "rss": _rss(), "pool_rss": pool_rss, "started": started})
        elif words[0] == "idle":  # idle S1 S2 ...: RSS at each of those moments after the last request
            started = time.monotonic()
            samples = []
            for moment in map(float, words[1:]):
                time.sleep(max(0.0, started + moment - time.monotonic()))
                samples.append(_rss())
            reply({"rss": samples})
        else:
            figures = {}
            if pool is not None:
                s = pool.stats()
                figures = {k: getattr(s, k) for k in (
                    "hits", "misses", "releases", "bytes_released_by_time", "bytes_released_by_exits",
                    "bytes_released_by_pressure", "refaults", "bytes_refaulted", "hold_after", "hold_idle_s",
                    "working_set_bytes", "bytes_reserved", "peak_bytes_in_use", "segments")}
            reply({"poolscope": figures})
            return


# --- the parent: scheduling by each setup's own clock ----------------------------------------------


def setups_wanted(wanted: tuple[str, ...]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Setup name -> environment. Peers by name (``_harness.peers``); ``poolscope`` with its
    defaults; ``poolscope@256KiB``, another threshold (what the faults below 1 MiB are:
    ``bands``); ``poolscope+tcmalloc``, poolscope's scopes in a process whose allocator is a
    preloaded peer (the two compose: the peer serves what is below the threshold)."""
    ours = [w for w in wanted if w.startswith("poolscope")]
    under = {w.partition("+")[2] for w in ours} - {""}
    unknown = sorted((set(wanted) - set(ours) | under) - set(PEERS))
    if unknown:
        raise SystemExit(f"--setups: unknown setup(s) {', '.join(unknown)}; peers are {', '.join(PEERS)}, and poolscope, "
                         "poolscope@THRESHOLD (e.g. poolscope@256KiB) or poolscope+PEER (e.g. poolscope+tcmalloc)")
    found, missing = peers(tuple(dict.fromkeys(("plain",) + tuple(w for w in wanted if w not in ours) + tuple(under))))
    setups = {"plain": found["plain"]}
    for name in ours:
        base, _, preload = name.partition("+")
        env = {} if not preload else found.get(preload)
        if env is None:
            continue  # its peer is missing: noted
        _, _, threshold = base.partition("@")
        setups[name] = {**env, "POOLSCOPE_THRESHOLD": threshold} if threshold else dict(env)
    setups.update((w, found[w]) for w in wanted if w in found and w != "plain")
    return setups, missing


def bands(counted: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Page faults per request by allocation size band, from the poolscope setups at several
    thresholds: what a setup at a lower threshold no longer faults lay between the two thresholds
    (request by request, the median over the requests both served); what the lowest one still
    faults lies below it, beside what it pooled and faulted in (its misses)."""
    from poolscope._config import parse_threshold

    levels = sorted(((parse_threshold(name.partition("@")[2] or "1MiB"), name) for name in counted
                     if name.startswith("poolscope") and "+" not in name), reverse=True)
    if len(levels) < 2:
        return []
    rows = []
    by_index = {name: {r["index"]: r for r in counted[name]} for _, name in levels}
    for (high, upper), (low, lower) in zip(levels, levels[1:]):
        common = by_index[upper].keys() & by_index[lower].keys()
        saved = [by_index[upper][i]["faults"] - by_index[lower][i]["faults"] for i in common]
        rows.append({"band": f"{low // 1024} KiB to {high // 1024} KiB", "from": f"{upper} - {lower}",
                     "faults": statistics.median(saved) if saved else None,
                     "faults_mean": statistics.fmean(saved) if saved else None})
    low, lowest = levels[-1]
    left = counted[lowest]
    rows.append({"band": f"below {low // 1024} KiB, and what {lowest} pooled and faulted in", "from": lowest,
                 "faults": statistics.median(r["faults"] for r in left) if left else None,
                 "faults_mean": statistics.fmean(r["faults"] for r in left) if left else None,
                 "misses_per_request": statistics.fmean(r["misses"] for r in left) if left else None})
    return rows


class Setup(ChildProcess):
    """One setup's server (``child``), with the records of the requests it served."""

    def __init__(self, name: str, env: dict[str, str], args: argparse.Namespace) -> None:
        mode = "poolscope" if name.startswith("poolscope") else "plain"
        argv = [sys.executable, __file__, "--child", args.workload, mode, str(args.requests), str(args.seed)]
        super().__init__(name, argv + (["--smoke"] if args.smoke else []), {**env, "TOKENIZERS_PARALLELISM": "false"})
        self.records: list[dict[str, Any]] = []
        self.last_end: Optional[float] = None

    def serve(self, indices: list[int], after_wait: bool) -> None:
        gap = None if self.last_end is None else time.monotonic() - self.last_end
        reply = self.ask("serve " + " ".join(map(str, indices)))
        self.last_end = time.monotonic()
        for r in reply["replies"]:
            self.records.append({**r, "gap": gap, "rss": reply["rss"], "pool_rss": reply["pool_rss"],
                                 "wall": reply["wall"], "after_wait": after_wait})


def run(args: argparse.Namespace, setups: dict[str, dict[str, str]], log: Callable[[str], None]) -> dict[str, Any]:
    order = list(setups)
    children = {name: Setup(name, env, args) for name, env in setups.items()}
    try:
        for child in children.values():
            child.ask()
        per_turn = args.threads
        batches = [list(range(i, min(i + per_turn, args.requests))) for i in range(0, args.requests, per_turn)]
        if args.gap == 0:
            turn = 0
            for start in range(0, len(batches), args.burst):
                names = order[turn % len(order):] + order[:turn % len(order)]
                turn += 1
                for name in names:
                    for k, batch in enumerate(batches[start:start + args.burst]):
                        children[name].serve(batch, after_wait=(k == 0))
                served = min(start + args.burst, len(batches))
                if served % 100 < args.burst:
                    log(f"    {served}/{len(batches)} requests served by each setup")
                    # What a long stream has shown so far, should it be stopped before the end.
                    write_json(args.out, f"serving-{args.workload}-gap0-t{args.threads}-partial.json",
                               {name: [{k: r[k] for k in ("index", "time", "faults", "misses", "rss", "pool_rss", "digest")}
                                       for r in child.records] for name, child in children.items()})
        else:
            due = {name: time.monotonic() for name in order}
            done = dict.fromkeys(order, 0)
            while any(done[n] < len(batches) for n in order):
                name = min((n for n in order if done[n] < len(batches)), key=lambda n: (due[n], order.index(n)))
                time.sleep(max(0.0, due[name] - time.monotonic()))
                children[name].serve(batches[done[name]], after_wait=False)
                done[name] += 1
                due[name] = time.monotonic() + args.gap
                if done[name] % 10 == 0:
                    log(f"    {name}: {done[name]}/{len(batches)}")
        for child in children.values():  # all at once: the setups idle together
            child.send("idle " + " ".join(f"{m:g}" for m in args.idle))
        idle = {name: child.ask() for name, child in children.items()}
        figures = {name: child.ask("end") for name, child in children.items()}
    finally:
        for child in children.values():
            child.close()
    return {name: {"records": children[name].records, "idle_rss": idle[name]["rss"], **figures[name]} for name in order}


def counted_records(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each setup's requests that the per-request figures count: after the warm-up, and not the
    first of a burst (which waited for the other setups' turns)."""
    return {name: [r for r in res["records"] if r["index"] >= args.warmup and not r["after_wait"]]
            for name, res in results.items()}


def window_peaks(rss: list[int], windows: int = 10) -> list[int]:
    """The largest RSS in each tenth of the stream (fewer windows in a shorter stream)."""
    size = max(1, -(-len(rss) // windows))
    return [max(rss[i:i + size]) for i in range(0, len(rss), size)]


def growth_second_half(peaks: list[int]) -> float:
    """MiB: the largest window peak of the second half over its first. A pool that gives memory
    back between bursts rises and falls within a window, which is not growth."""
    return (max(peaks[len(peaks) // 2:]) - peaks[len(peaks) // 2]) / 2**20 if peaks else 0.0


def summarize(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    plain_digests = {r["index"]: r["digest"] for r in results["plain"]["records"]}
    counted = counted_records(args, results)
    peers_here = [p for p in PEERS if p in results]
    by_index = {name: {r["index"]: r for r in rec} for name, rec in counted.items()}
    fastest = min((p for p in peers_here), key=lambda p: statistics.median(r["time"] for r in counted[p]) if counted[p] else 1e9)
    summary: dict[str, Any] = {}
    for name, res in results.items():
        rec = counted[name]
        rss = [r["rss"] for r in res["records"]]
        peaks = window_peaks(rss)
        gaps = [r["gap"] for r in res["records"] if r["gap"] is not None and not r["after_wait"]]
        row = {
            "ms": statistics.median(r["time"] for r in rec) * 1e3 if rec else None,
            "faults": statistics.median(r["faults"] for r in rec) if rec else None,
            "faults_mean": statistics.fmean(r["faults"] for r in rec) if rec else None,
            "rss_mib_end_of_stream": rss[-1] / 2**20,
            "rss_peaks_mib": [x / 2**20 for x in peaks],
            "rss_growth_second_half_mib": growth_second_half(peaks),
            "idle_rss_mib": {f"{m:g}": x / 2**20 for m, x in zip(args.idle, res["idle_rss"])},
            "identical": all(plain_digests.get(r["index"]) == r["digest"] for r in res["records"]),
            "gap_s": [min(gaps), statistics.median(gaps), max(gaps)] if gaps else None,
            "requests_per_s": (len(res["records"]) / sum(r["wall"] for r in res["records"] if r["index"] % args.threads == 0)),
            "rss_mib": [x / 2**20 for x in rss],
            "poolscope": res.get("poolscope", {}),
        }
        # Request by request against the peer with the lowest median (another peer than this one).
        rival = fastest if fastest != name else min(
            (p for p in peers_here if p != name), key=lambda p: statistics.median(r["time"] for r in counted[p]), default=None)
        ratios = [r["time"] / by_index[rival][i]["time"] for i, r in by_index[name].items()
                  if rival is not None and i in by_index[rival]]
        row["vs_fastest_peer"] = statistics.median(ratios) if ratios else None
        row["fastest_peer"] = rival
        row["records"] = [{k: r[k] for k in ("index", "time", "faults", "misses", "rss", "pool_rss", "gap")}
                          for r in res["records"]]
        if all(r["pool_rss"] is not None for r in res["records"]):
            # RSS less the pool's resident pages: whether growth is the pool's or the rest's.
            outside = window_peaks([r["rss"] - r["pool_rss"] for r in res["records"]])
            row["rss_outside_pool_peaks_mib"] = [x / 2**20 for x in outside]
            row["rss_outside_pool_growth_second_half_mib"] = growth_second_half(outside)
            row["pool_rss_peaks_mib"] = [x / 2**20 for x in window_peaks([r["pool_rss"] for r in res["records"]])]
        if name == "poolscope" and rec:
            row["misses_per_request_after_warmup"] = statistics.fmean(r["misses"] for r in rec)
        summary[name] = row
    return summary


def svg(series: dict[str, list[float]], title: str) -> str:
    """RSS over the stream, one polyline per setup (no plotting library needed)."""
    width, height, pad = 720, 360, 48
    top = max(max(v) for v in series.values()) * 1.05 or 1
    longest = max(len(v) for v in series.values())
    colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<text x="{pad}" y="20">{title}</text>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="30" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width // 2}" y="{height - 12}">request</text>',
             f'<text x="4" y="40">{top:.0f} MiB</text><text x="4" y="{height - pad}">0</text>']
    for k, (name, values) in enumerate(series.items()):
        pts = " ".join(f"{pad + i * (width - pad - 10) / max(1, longest - 1):.1f},{height - pad - v / top * (height - pad - 30):.1f}"
                       for i, v in enumerate(values))
        colour = colours[k % len(colours)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{width - 130}" y="{40 + 16 * k}" fill="{colour}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        workload, mode, count, seed = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        child(workload, mode, count, seed, "--smoke" in sys.argv)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("embedding", "chat"), default="embedding")
    parser.add_argument("--gap", type=float, default=0.0, help="seconds between two requests of a setup")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="first requests left out of the medians")
    parser.add_argument("--burst", type=int, default=10, help="gap 0: requests per turn")
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    parser.add_argument("--idle", default="60,330", help="RSS these many seconds after the last request (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setups", default=",".join(("poolscope",) + PEERS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--smoke", action="store_true", help="a tiny torch encoder, a few requests: checks that it runs")
    args = parser.parse_args()
    args.idle = [float(m) for m in str(args.idle).split(",")]
    if args.smoke:
        args.requests, args.warmup, args.idle, args.burst = 6, 1, [0.1, 0.2], 3
        args.gap = min(args.gap, 0.2)
    setups, missing = setups_wanted(tuple(args.setups.split(",")))
    for note in missing:
        print(f"note: {note}; that column is left out")
    where = machine()
    print(f"{args.workload}, gap {args.gap:g} s, {args.requests} requests, {args.threads} thread(s); {where}")
    started = time.monotonic()
    results = run(args, setups, print)
    summary = summarize(args, results)
    rows = []
    for name, row in summary.items():
        vs = f"{row['vs_fastest_peer']:.2f}x ({row['fastest_peer']})" if row["vs_fastest_peer"] else "-"
        rows.append([name, f"{row['ms']:.0f}", vs,
                     f"{row['faults']:.0f}", f"{row['faults_mean']:.0f}", f"{row['requests_per_s']:.2f}",
                     f"{row['rss_mib_end_of_stream']:.0f}", f"{row['rss_growth_second_half_mib']:.0f}" + (
                         f" ({row['rss_outside_pool_growth_second_half_mib']:.0f} outside the pool)"
                         if "rss_outside_pool_growth_second_half_mib" in row else ""),
                     " / ".join(f"{v:.0f}" for v in row["idle_rss_mib"].values()), "yes" if row["identical"] else "NO",
                     "/".join(f"{g:.1f}" for g in row["gap_s"]) if row["gap_s"] else "-"])
    table = markdown(["setup", "ms/request (median)", "vs fastest peer", "faults (median)", "faults (mean)", "req/s",
                      "RSS end MiB", "RSS growth 2nd half", "RSS idle " + " / ".join(f"{m:g} s" for m in args.idle),
                      "identical", "gap min/med/max s"], rows)
    print(markdown(["workload", "gap s", "requests", "threads", "machine"],
                   [[args.workload, f"{args.gap:g}", str(args.requests), str(args.threads), where]]))
    print()
    print(table)
    if "poolscope" in summary:
        print("poolscope:", json.dumps(summary["poolscope"]["poolscope"]),
              "misses per request after warm-up:", summary["poolscope"].get("misses_per_request_after_warmup"))
    by_band = bands(counted_records(args, results))
    if by_band:
        print()
        print(markdown(["size band", "faults per request (median)", "(mean)", "from"],
                       [[b["band"], f"{b['faults']:.0f}", f"{b['faults_mean']:.0f}", b["from"]] for b in by_band]))
    name = f"serving-{args.workload}-gap{args.gap:g}-t{args.threads}{'-smoke' if args.smoke else ''}"
    data = {"machine": where, "args": {k: str(v) for k, v in vars(args).items()}, "summary": summary,
            "bands": by_band, "table": table, "seconds": time.monotonic() - started}
    path = write_json(args.out, name + ".json", data)
    (args.out / (name + ".svg")).write_text(svg({n: r["rss_mib"] for n, r in summary.items()},
                                                f"RSS (MiB) after each request: {args.workload}, gap {args.gap:g} s"))
    print(f"wrote {path}")
    return 0 if all(row["identical"] for row in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
