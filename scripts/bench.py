#!/usr/bin/env python3
"""Benchmark: KV-cache reuse vs recomputation, batching vs one at a time, engine overhead.

Starts its own clusters on loopback with `gpt2-small-random` (GPT-2 124M shapes, random
weights): one worker with KV reuse, one with reuse disabled (every request recomputes its whole
context). Plain transformers (`model.generate` / a bare forward loop, sdpa attention) runs in
this process as the alternative a user would pick. Run it on an otherwise idle machine:

    .venv/bin/python scripts/bench.py            # writes bench_results/{results.json,results.md,results.png}
    .venv/bin/python scripts/bench.py --reps 3   # quicker
    .venv/bin/python scripts/bench.py --scenarios 6,7   # only these; the others' last results are kept

Scenarios (medians over repetitions, min/max in the JSON and the table):
  1. continuation TTFT: ~990 tokens cached + 16 new, cached vs recompute vs transformers
  2. the same continuation end to end with 16 generated tokens
  3. 16 concurrent generations x 32 tokens vs the same 16 one at a time (tokens/s)
  4. engine time per decode step at batch 1 vs a bare transformers forward + argmax
  5. decode step time at ~1024 vs ~128 tokens of context
  6. continuation TTFT right after its owner leaves: drained (KV handed off) vs SIGKILLed (recomputed)
  7. scale-out 2 -> 3 and scale-in 3 -> 2 workers under steady multi-turn load: failures, lost
     histories, handoff tokens, TTFT p50/p99 around each change
  8. 32 OpenAI chat sessions x 6 turns resending their history: session-affine vs round-robin
     routing (throughput, prefix hit rate); 8 with one system prompt shared by all sessions,
     8b with a system prompt of each session's own (--s8-system-prompt); --s8-system-tokens sets
     its length (default 512; another length is kept apart as s8-<n>sys, s8b-<n>sys), --s8-kv-mib
     the workers' KV budget (default 1536 MiB: affinity's conversations fit, round-robin's copies
     of them do not; 4096 MiB: no eviction; another is kept apart as s8-<n>mib)
  9. skewed load on 3 workers (40 of 48 conversations owned by one worker): plain ring vs bounded
     loads (GATEWAY_LOAD_FACTOR=1.25), TTFT p99 and throughput
 10. routing tax: a tiny request through the gateway vs straight to its worker (p50/p99)
Scenarios 6 and 7 live in scripts/bench_elastic.py, 8 in scripts/bench_openai.py, 9 and 10 in
scripts/bench_routing.py. `--s3-workers 2` runs scenario 3 on the default 2-worker local cluster
instead (results kept apart as s3-2w).

    .venv/bin/python scripts/bench.py --load-run --sessions 8 --duration 60   # = scripts/load_run.py ...

runs scripts/load_run.py instead (every argument after --load-run is its own; see its --help).
"""

import argparse
import datetime
import json
import platform
import random
import statistics
import string
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.sse import parse_events  # noqa: E402
from services.localcluster import LocalCluster  # noqa: E402
from services.worker.model.presets import resolve_model_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_elastic  # noqa: E402
import bench_openai  # noqa: E402
import bench_routing  # noqa: E402
import bench_tiers  # noqa: E402
import load_run  # noqa: E402

MODEL = "gpt2-small-random"
ALL_SCENARIOS = list(range(1, 14))
# One client for the whole run: building an httpx.Client loads CA certificates (tens of ms).
CLIENT = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=32))
CACHED_CONTEXT = 990   # GPT-2's window is 1024: 990 cached + 16 new + 16 generated = 1022
NEW_TOKENS = 16
# Between a reply and the next turn a user reads; the worker uses that gap to write the last
# generated token's KV (one decode step). Both the cached and the recompute runs wait the same.
THINK_TIME_S = 0.5


def text(n: int, rng: random.Random) -> str:
    """n ASCII characters = n tokens with the byte-level tokenizer."""
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def stream(url: str, **body) -> dict:
    """POST /generate; returns the done event plus client-side ttft_s and total_s."""
    ttft = None
    t0 = time.perf_counter()
    with CLIENT.stream("POST", f"{url}/generate", json=body) as resp:
        resp.raise_for_status()
        for event in parse_events(resp.iter_lines()):
            if event["type"] == "token" and ttft is None:
                ttft = time.perf_counter() - t0
            if event["type"] == "error":
                raise RuntimeError(event)
            if event["type"] == "done":
                return {**event, "client_ttft_s": ttft, "client_total_s": time.perf_counter() - t0}
    raise RuntimeError("stream ended without done")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


class Bare:
    """Plain transformers in this process: what a user would run without this system."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def generate(self, ids: list[int], new: int) -> tuple[float, float]:
        """(ttft_s, total_s) for model.generate, greedy. TTFT timed as generate(max_new_tokens=1)."""
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        self.model.generate(x, max_new_tokens=1, do_sample=False, pad_token_id=0)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        return ttft, time.perf_counter() - t0

    @torch.inference_mode()
    def decode_step_s(self, context: int, steps: int) -> float:
        """Median time of one decode step (forward of one token with a DynamicCache + argmax)."""
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        out = self.model(torch.randint(0, 50000, (1, context)), past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = self.model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def scenario_continuation(cached: str, recompute: str, bare: Bare, reps: int, generated: int,
                          rng: random.Random) -> dict:
    """Scenarios 1 (generated=1: TTFT) and 2 (generated=16: end to end)."""
    rows = {"cached": [], "recompute": [], "transformers": [], "cached_server_ttft": [],
            "recompute_server_ttft": [], "cached_tokens": []}
    key = "client_ttft_s" if generated == 1 else "client_total_s"
    for _ in range(reps):
        first, follow = text(CACHED_CONTEXT - 1, rng), text(NEW_TOKENS, rng)
        for name, url in (("cached", cached), ("recompute", recompute)):
            seq = f"bench-{uuid.uuid4().hex[:10]}"
            stream(url, prompt=first, seq_id=seq, max_tokens=1, temperature=0)
            time.sleep(THINK_TIME_S)
            done = stream(url, prompt=follow, seq_id=seq, max_tokens=generated, temperature=0)
            rows[name].append(done[key])
            rows[f"{name}_server_ttft"].append(done["timings"]["ttft_ms"] / 1000)
            if name == "cached":
                rows["cached_tokens"].append(done["usage"]["cached_tokens"])
        ids = list((first + "x" + follow).encode())  # same length as the cached context + new
        ttft, total = bare.generate(ids, generated)
        rows["transformers"].append(ttft if generated == 1 else total)
    return {k: summary(v) for k, v in rows.items()}


def scenario_batching(url: str, reps: int, rng: random.Random) -> dict:
    """Scenario 3: 16 x 32 tokens, concurrently vs one at a time, on the same worker."""
    def one(i: int) -> dict:
        return stream(url, prompt=text(16, rng), seq_id=f"batch-{uuid.uuid4().hex[:8]}-{i}",
                      max_tokens=32, temperature=0)

    concurrent, sequential = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            done = list(pool.map(one, range(16)))
        concurrent.append(sum(d["usage"]["completion_tokens"] for d in done) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        done = [one(i) for i in range(16)]
        sequential.append(sum(d["usage"]["completion_tokens"] for d in done) / (time.perf_counter() - t0))
    return {"concurrent_tok_s": summary(concurrent), "sequential_tok_s": summary(sequential),
            "speedup": summary([c / s for c, s in zip(concurrent, sequential)])}


def server_step_s(url: str, prompt_tokens: int, steps: int, rng: random.Random) -> float:
    done = stream(url, prompt=text(prompt_tokens, rng), seq_id=f"step-{uuid.uuid4().hex[:8]}",
                  max_tokens=steps + 1, temperature=0)
    return done["timings"]["decode_ms"] / 1000 / steps  # first token comes from the prefill


def scenario_step_overhead(url: str, bare: Bare, reps: int, rng: random.Random) -> dict:
    """Scenario 4: per decode step, batch 1, short context: engine (server-side) vs bare."""
    engine, plain = [], []
    for _ in range(2 * reps):  # paired and interleaved: the machine's drift hits both alike
        engine.append(server_step_s(url, 64, 64, rng))
        plain.append(bare.decode_step_s(64, 64))
    return {"engine_step_s": summary(engine), "bare_step_s": summary(plain),
            "overhead": summary([e / b - 1 for e, b in zip(engine, plain)])}


def scenario_context_growth(url: str, bare: Bare, reps: int, rng: random.Random) -> dict:
    """Scenario 5: decode step time at ~1024 vs ~128 tokens of context."""
    rows = {"engine_128": [], "engine_1024": [], "bare_128": [], "bare_1024": []}
    for _ in range(reps):
        rows["engine_128"].append(server_step_s(url, 112, 32, rng))
        rows["engine_1024"].append(server_step_s(url, 975, 32, rng))
        rows["bare_128"].append(bare.decode_step_s(112, 32))
        rows["bare_1024"].append(bare.decode_step_s(975, 32))
    out = {k: summary(v) for k, v in rows.items()}
    out["engine_ratio"] = summary([b / a for a, b in zip(rows["engine_128"], rows["engine_1024"])])
    out["bare_ratio"] = summary([b / a for a, b in zip(rows["bare_128"], rows["bare_1024"])])
    return out


def ratio(a: dict, b: dict) -> float:
    return a["median"] / b["median"]


def fmt(s: dict, scale: float = 1000, unit: str = "ms") -> str:
    return f"{s['median'] * scale:.1f} {unit} ({s['min'] * scale:.1f}-{s['max'] * scale:.1f})"


def table(r: dict) -> str:
    """Scenarios 1-5 (those measured)."""
    s1, s2, s3, s4, s5 = (r.get(f"s{i}") for i in range(1, 6))
    rows = [
        s1 and f"| 1. continuation TTFT, {s1['cached_tokens']['median']:.0f} cached + {NEW_TOKENS} new | "
        f"{fmt(s1['cached'])} | recompute {fmt(s1['recompute'])}; transformers {fmt(s1['transformers'])} | "
        f"**{ratio(s1['recompute'], s1['cached']):.1f}x** (vs transformers {ratio(s1['transformers'], s1['cached']):.1f}x) | >= 13x |",
        s2 and f"| 2. same, end to end with 16 generated | {fmt(s2['cached'])} | recompute {fmt(s2['recompute'])}; "
        f"transformers {fmt(s2['transformers'])} | **{ratio(s2['recompute'], s2['cached']):.1f}x** "
        f"(vs transformers {ratio(s2['transformers'], s2['cached']):.1f}x) | >= 2.5x |",
        s3 and f"| 3. 16 concurrent x 32 tokens, tokens/s | {fmt(s3['concurrent_tok_s'], 1, 'tok/s')} | "
        f"one at a time {fmt(s3['sequential_tok_s'], 1, 'tok/s')} | **{s3['speedup']['median']:.2f}x** "
        f"({s3['speedup']['min']:.2f}-{s3['speedup']['max']:.2f}) | >= 3x |",
        s4 and f"| 4. decode step, batch 1 (engine vs bare forward) | {fmt(s4['engine_step_s'])} | "
        f"{fmt(s4['bare_step_s'])} | **{s4['overhead']['median'] * 100:+.1f}%** "
        f"({s4['overhead']['min'] * 100:+.1f}% to {s4['overhead']['max'] * 100:+.1f}%) | <= +10% |",
        s5 and f"| 5. decode step at ~1024 vs ~128 context | {fmt(s5['engine_1024'])} vs {fmt(s5['engine_128'])} | "
        f"transformers {fmt(s5['bare_1024'])} vs {fmt(s5['bare_128'])} | **{s5['engine_ratio']['median']:.2f}x** "
        f"(transformers {s5['bare_ratio']['median']:.2f}x) | attention growth only |",
    ]
    rows = [row for row in rows if row]
    if not rows:
        return ""
    return "\n".join(["| scenario | kvcache | baseline | ratio | target |", "|---|---|---|---|---|", *rows])


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in ((axes[0], "s1", "1. continuation TTFT (ms)"), (axes[1], "s2", "2. continuation + 16 tokens (ms)")):
        names = ["cached", "recompute", "transformers"]
        ax.bar(names, [r[key][n]["median"] * 1000 for n in names], color=["tab:green", "tab:red", "tab:gray"])
        ax.set_title(title)
    s3 = r["s3"]
    axes[2].bar(["16 concurrent", "one at a time"], [s3["concurrent_tok_s"]["median"], s3["sequential_tok_s"]["median"]],
                color=["tab:green", "tab:gray"])
    axes[2].set_title("3. tokens/s, 16 x 32 tokens")
    fig.suptitle(f"kvcache, {MODEL} on {platform.processor() or platform.machine()}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    import os
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def parse_scenarios(value: str) -> list[int]:
    chosen = sorted({int(x) for x in value.split(",") if x.strip()})
    if not chosen or not set(chosen) <= set(ALL_SCENARIOS):
        raise argparse.ArgumentTypeError("comma-separated scenario numbers, 1 to 13")
    return chosen


def run_classic(chosen: list[int], args: argparse.Namespace, rng: random.Random) -> dict:
    """Scenarios 1-5: one cluster with KV reuse, one without, plain transformers in-process."""
    path = resolve_model_path(MODEL, args.model_cache_dir)
    env = {"WORKER_MODEL_NAME": MODEL, "WORKER_MODEL_CACHE_DIR": str(args.model_cache_dir),
           "WORKER_KV_CACHE_BYTES": str(4 << 30)}
    cached = LocalCluster(num_workers=1, log_dir=args.out / "logs-cached", worker_env=env)
    # The same path for both: client -> gateway -> (coordinator route) -> worker.
    recompute = LocalCluster(num_workers=1, log_dir=args.out / "logs-recompute",
                             worker_env={**env, "WORKER_ENABLE_KV_REUSE": "false"})
    print(f"starting clusters ({MODEL})...", flush=True)
    bare = Bare(path)
    results = {}
    with cached, recompute:
        gw, rc = cached.gateway_url, recompute.gateway_url
        CLIENT.headers.update(cached.internal_headers)  # s4 and s5 ask its worker directly
        stream(gw, prompt=text(64, rng), max_tokens=8, temperature=0)  # warm-up
        stream(rc, prompt=text(64, rng), max_tokens=8, temperature=0)
        bare.generate(list(range(64)), 4)
        steps = [("s1", lambda: scenario_continuation(gw, rc, bare, args.reps, 1, rng)),
                 ("s2", lambda: scenario_continuation(gw, rc, bare, args.reps, 16, rng)),
                 ("s3", lambda: scenario_batching(gw, max(2, args.reps // 2), rng)),
                 ("s4", lambda: scenario_step_overhead(cached.worker_urls[0], bare, args.reps, rng)),
                 ("s5", lambda: scenario_context_growth(cached.worker_urls[0], bare, args.reps, rng))]
        for key, run in steps:
            if int(key[1]) not in chosen:
                continue
            t0 = time.perf_counter()
            results[key] = run()
            print(f"scenario {key[1]} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def run_s3_cluster(args: argparse.Namespace, rng: random.Random) -> dict:
    """Scenario 3 through the gateway of a local cluster of --s3-workers workers (scripts/local_dev.sh's shape)."""
    resolve_model_path(MODEL, args.model_cache_dir)
    env = {"WORKER_MODEL_NAME": MODEL, "WORKER_MODEL_CACHE_DIR": str(args.model_cache_dir)}
    print(f"scenario 3 on {args.s3_workers} workers...", flush=True)
    with LocalCluster(num_workers=args.s3_workers, log_dir=args.out / f"logs-s3-{args.s3_workers}w",
                      worker_env=env) as cluster:
        for i in range(2 * args.s3_workers):  # every worker's first forward, outside the measurement
            stream(cluster.gateway_url, prompt=text(16, rng), seq_id=f"warm-{i}", max_tokens=4, temperature=0)
        return {**scenario_batching(cluster.gateway_url, args.reps, rng), "workers": args.s3_workers}


def table_s3_cluster(r: dict) -> str:
    return (f"Scenario 3 on a local cluster of {r['workers']} workers (through the gateway, {r['speedup']['n']} runs): "
            f"16 concurrent x 32 tokens {fmt(r['concurrent_tok_s'], 1, 'tok/s')} vs one at a time "
            f"{fmt(r['sequential_tok_s'], 1, 'tok/s')}: **{r['speedup']['median']:.2f}x** "
            f"({r['speedup']['min']:.2f}-{r['speedup']['max']:.2f}; target >= 3x).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="repetitions of scenarios 1-6")
    parser.add_argument("--scenarios", type=parse_scenarios, default=ALL_SCENARIOS,
                        help="comma-separated, e.g. 6,7 (default: all); results of the others already "
                             "in <out>/results.json are kept")
    parser.add_argument("--s7-runs", type=int, default=3, help="runs of scenario 7")
    parser.add_argument("--s7-seconds", type=float, default=60.0,
                        help="scenario 7's load duration; scale-out at 15/60 of it, scale-in at 35/60 "
                             "(later, and the load longer, if the new worker takes long to start)")
    parser.add_argument("--s8-runs", type=int, default=3, help="runs of scenario 8 per routing mode")
    parser.add_argument("--s8-system-prompt", choices=("shared", "own", "both"), default="both",
                        help="scenario 8's sessions share one system prompt (8), have one each (8b), or both")
    parser.add_argument("--s8-workers", type=int, default=2,
                        help="workers of scenario 8 (results of another count than 2 are kept apart: s8-<n>w)")
    parser.add_argument("--s8-system-tokens", type=int, default=bench_openai.SYSTEM_CHARS,
                        help="scenario 8's system prompt length in tokens (at most ~520: 6 turns fit 1024 positions)")
    parser.add_argument("--s8-kv-mib", type=int, default=bench_openai.KV_MIB,
                        help="scenario 8's KV budget per worker (another than the default is kept apart as s8-<n>mib)")
    parser.add_argument("--s9-runs", type=int, default=3, help="runs of scenario 9 per mode (plain, bounded)")
    parser.add_argument("--tier-runs", type=int, default=3, help="runs of scenarios 11-13 per mode (tiers, recompute)")
    parser.add_argument("--s10-pairs", type=int, default=bench_routing.TAX_PAIRS, help="rounds of scenario 10")
    parser.add_argument("--s3-workers", type=int, default=1,
                        help="workers of scenario 3's cluster (2: the default local cluster; kept apart as s3-2w)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "kvcache" / "models")
    parser.add_argument("--load-run", nargs=argparse.REMAINDER, metavar="ARGS",
                        help="run scripts/load_run.py with the arguments that follow instead of the scenarios")
    args = parser.parse_args()
    if args.load_run is not None:
        return load_run.main(args.load_run)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    print(f"machine: {machine()}\nscenarios: {args.scenarios}", flush=True)
    previous = args.out / "results.json"
    results = json.loads(previous.read_text()) if previous.exists() and args.scenarios != ALL_SCENARIOS else {}
    results.setdefault("measured_at", {})
    now = datetime.datetime.now().isoformat(timespec="seconds")
    classic = [i for i in args.scenarios if i <= 5 and not (i == 3 and args.s3_workers > 1)]
    if 3 in args.scenarios and args.s3_workers > 1:
        key = f"s3-{args.s3_workers}w"
        results[key] = run_s3_cluster(args, rng)
        results["measured_at"][key] = now
    if classic:
        measured = run_classic(classic, args, rng)
        results.update(measured, model=MODEL, machine=machine(), reps=args.reps)
        results["measured_at"].update({k: now for k in measured})
    def measure(number: int, title: str, run) -> None:
        if number in args.scenarios:
            t0 = time.perf_counter()
            print(f"scenario {number}: {title}...", flush=True)
            results[f"s{number}"] = run()
            results["measured_at"][f"s{number}"] = now
            print(f"scenario {number} done in {time.perf_counter() - t0:.0f} s", flush=True)

    measure(6, "handoff vs recompute after the owner leaves",
            lambda: bench_elastic.scenario_handoff(args.out, args.model_cache_dir, args.reps, rng))
    measure(7, "scale-out and scale-in under load",
            lambda: bench_elastic.scenario_scaling(args.out, args.model_cache_dir, args.s7_runs, args.s7_seconds))
    if 8 in args.scenarios:
        t0 = time.perf_counter()
        print("scenario 8: OpenAI chat sessions, affinity vs round-robin...", flush=True)
        suffix = ("" if args.s8_workers == 2 else f"-{args.s8_workers}w") + (
            "" if args.s8_system_tokens == bench_openai.SYSTEM_CHARS else f"-{args.s8_system_tokens}sys") + (
            "" if args.s8_kv_mib == bench_openai.KV_MIB else f"-{args.s8_kv_mib}mib")
        for key, shared in ((f"s8{suffix}", True), (f"s8b{suffix}", False)):
            if args.s8_system_prompt in ("both", "shared" if shared else "own"):
                results[key] = bench_openai.scenario_openai_chat(args.out, args.model_cache_dir, args.s8_runs, shared,
                                                                 args.s8_workers, args.s8_system_tokens, args.s8_kv_mib)
                results["measured_at"][key] = now
        print(f"scenario 8 done in {time.perf_counter() - t0:.0f} s", flush=True)
    measure(9, "skewed load, plain ring vs bounded loads",
            lambda: bench_routing.scenario_skewed_load(args.out, args.model_cache_dir, args.s9_runs))
    measure(10, "routing tax", lambda: bench_routing.scenario_routing_tax(args.out, args.model_cache_dir, args.s10_pairs))
    measure(11, "revisits beyond device memory, tiers vs recompute",
            lambda: bench_tiers.scenario_revisit(args.out, args.model_cache_dir, args.tier_runs, rng))
    measure(12, "a worker crash, tiers vs recompute",
            lambda: bench_tiers.scenario_crash(args.out, args.model_cache_dir, args.tier_runs, rng))
    measure(13, "a working set 4x device memory, tiers vs recompute",
            lambda: bench_tiers.scenario_capacity(args.out, args.model_cache_dir, args.tier_runs, rng))
    results.setdefault("machine", machine())
    md = ""
    classic = table(results)
    if classic:
        md += (f"Machine: {results['machine']}; model {results.get('model', MODEL)}; medians of "
               f"{results.get('reps', args.reps)} runs (min-max).\n\n{classic}\n")
    for key, render in (("s3-2w", table_s3_cluster), ("s6", bench_elastic.table_s6), ("s7", bench_elastic.table_s7),
                        ("s9", bench_routing.table_s9), ("s10", bench_routing.table_s10),
                        ("s11", bench_tiers.table_s11), ("s12", bench_tiers.table_s12), ("s13", bench_tiers.table_s13),
                        *((k, bench_openai.table_s8) for k in sorted(results) if k.startswith(("s8-", "s8b")) or k == "s8")):
        if key in results:
            md += f"\n{render(results[key])}\n"
    dates = ", ".join(f"{k} {v}" for k, v in sorted(results["measured_at"].items()))
    md += f"\nMeasured: {dates}. This run: {machine()}.\n"
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(md)
    written = ["results.json", "results.md"]
    if all(k in results for k in ("s1", "s2", "s3")):
        plot(results, args.out / "results.png")
        written.append("results.png")
    if 7 in args.scenarios:
        bench_elastic.plot_s7(results["s7"], args.out / "s7-timeline.json", args.out / "results-s7.png")
        written += ["results-s7.png", "s7-timeline.json"]
    print("\n" + md + f"\nwritten: {args.out}/{{{','.join(written)}}}")


if __name__ == "__main__":
    main()
