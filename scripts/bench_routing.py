"""Scenarios 9 and 10 of scripts/bench.py: routing. Run them through bench.py:

    .venv/bin/python scripts/bench.py --scenarios 9,10

  9. skewed load on 3 workers: 48 conversations, 40 of them hashing to one worker, 4 turns each,
     run closed-loop; plain consistent hashing vs bounded loads (GATEWAY_LOAD_FACTOR=1.25):
     client-side TTFT p50/p99 and throughput.
 10. routing tax: one tiny request (a few prompt tokens, max_tokens 1, streamed, tiny-gpt2 so
     that the model's time does not drown the gateway's) through the gateway vs straight to the
     worker that owns it, in rounds of three (gateway, direct, direct again; each first in turn;
     25 ms idle before each request, so that none pays for the previous one's work after `done`):
     the per-round difference gateway - direct, p50/p99; direct - direct is the noise floor that
     the same statistic has on this machine.

Each run starts its own cluster (LocalCluster: real processes on loopback).
"""

import random
import statistics
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench_elastic import percentile, summary, text, turn
from bench_openai import environ
from services.common.hash_ring import HashRing
from services.localcluster import LocalCluster
from services.worker.model.presets import resolve_model_path

MODEL = "gpt2-small-random"
KV_BYTES = str(2 << 30)

S9_WORKERS = 3
S9_SESSIONS = 48
S9_HOT = 40             # of them owned by one worker
S9_TURNS = 4
S9_PROMPT = 32          # characters = tokens
S9_MAX_TOKENS = 16
S9_FACTOR = "1.25"

TAX_MODEL = "tiny-gpt2"
TAX_PAIRS = 300
TAX_WARMUP = 20
# Idle before each request: the worker's work after a turn's `done` (the last token's KV step, held
# WORKER_TAIL_WAIT_S for a continuation that does not come here, then run; the session store)
# otherwise lands on whichever request comes next.
TAX_GAP_S = 0.025 + 0.05


def _env(model_cache_dir: Path, model: str = MODEL) -> dict[str, str]:
    return {"WORKER_MODEL_NAME": model, "WORKER_MODEL_CACHE_DIR": str(model_cache_dir),
            "WORKER_KV_CACHE_BYTES": KV_BYTES}


def ring_of(cluster: LocalCluster) -> HashRing:
    state = httpx.get(f"{cluster.coordinator_url}/ring", timeout=5).json()
    return HashRing.of([w["worker_id"] for w in state["workers"] if w["state"] == "active"], state["vnodes"])


def skewed_sessions(ring: HashRing, hot_worker: str, run: int) -> list[str]:
    """S9_HOT ids owned by `hot_worker`, the rest owned by the others."""
    ids = (f"s9-{run}-{i}" for i in range(1_000_000))
    hot, cold = [], []
    for seq in ids:
        (hot if ring.owner(seq) == hot_worker else cold).append(seq)
        if len(hot) >= S9_HOT and len(cold) >= S9_SESSIONS - S9_HOT:
            return hot[:S9_HOT] + cold[:S9_SESSIONS - S9_HOT]
    raise AssertionError("unreachable")


def s9_run(out: Path, model_cache_dir: Path, bounded: bool, run: int) -> dict:
    log_dir = out / f"s9-{'bounded' if bounded else 'plain'}-run{run}" / "logs"
    factor = S9_FACTOR if bounded else "0"
    with environ(GATEWAY_LOAD_FACTOR=factor), \
            LocalCluster(num_workers=S9_WORKERS, log_dir=log_dir, worker_env=_env(model_cache_dir)) as cluster:
        url = cluster.gateway_url
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=S9_SESSIONS + 8))
        for i in range(2 * S9_WORKERS):  # each worker's first forward, outside the measurement
            turn(url, client=client, prompt=f"warm {i}", seq_id=f"warm-{run}-{i}", max_tokens=2, temperature=0)
        sessions = skewed_sessions(ring_of(cluster), "worker-0", run)
        rng = random.Random(run)
        prompts = {s: [text(S9_PROMPT, rng) for _ in range(S9_TURNS)] for s in sessions}

        def conversation(seq: str) -> list[dict]:
            return [turn(url, client=client, prompt=p, seq_id=seq, max_tokens=S9_MAX_TOKENS, temperature=0)
                    for p in prompts[seq]]

        t0 = time.perf_counter()
        with ThreadPoolExecutor(S9_SESSIONS) as pool:
            results = [t for conv in pool.map(conversation, sessions) for t in conv]
        elapsed = time.perf_counter() - t0
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        client.close()
    ok = [t for t in results if t["ok"]]
    ttfts = [t["ttft_s"] for t in ok if t["ttft_s"] is not None]
    workers = [t["done"]["worker_id"] for t in ok if t["done"]]
    return {"bounded": bounded, "run": run, "seconds": elapsed, "turns": len(results), "failed": len(results) - len(ok),
            "turns_per_s": len(ok) / elapsed,
            "tokens_per_s": sum(t["done"]["usage"]["completion_tokens"] for t in ok if t["done"]) / elapsed,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "turns_by_worker": {w: workers.count(w) for w in sorted(set(workers))},
            "spilled": _counter(metrics, 'kvcache_gateway_routing_decisions_total{decision="spilled"}'),
            "handoff_tokens": sum(t["done"]["usage"].get("handoff_tokens", 0) for t in ok if t["done"])}


def _counter(metrics: str, series: str) -> float:
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(series)), 0.0)


def scenario_skewed_load(out: Path, model_cache_dir: Path, runs: int) -> dict:
    resolve_model_path(MODEL, model_cache_dir)
    rows: dict[str, list[dict]] = {"plain": [], "bounded": []}
    for run in range(runs):
        for bounded in ((False, True) if run % 2 == 0 else (True, False)):
            row = s9_run(out, model_cache_dir, bounded, run)
            rows["bounded" if bounded else "plain"].append(row)
            print(f"  s9 run {run + 1} {'bounded' if bounded else 'plain'}: {row['seconds']:.1f} s, "
                  f"TTFT p50/p99 {row['ttft_p50_s'] * 1000:.0f}/{row['ttft_p99_s'] * 1000:.0f} ms, "
                  f"{row['tokens_per_s']:.1f} tok/s, turns by worker {row['turns_by_worker']}, "
                  f"failed {row['failed']}", flush=True)
    p, b = rows["plain"], rows["bounded"]
    return {"runs": rows, "factor": float(S9_FACTOR), "sessions": S9_SESSIONS, "hot": S9_HOT, "turns": S9_TURNS,
            "plain_ttft_p99_s": summary([r["ttft_p99_s"] for r in p]),
            "bounded_ttft_p99_s": summary([r["ttft_p99_s"] for r in b]),
            "plain_ttft_p50_s": summary([r["ttft_p50_s"] for r in p]),
            "bounded_ttft_p50_s": summary([r["ttft_p50_s"] for r in b]),
            "plain_tokens_per_s": summary([r["tokens_per_s"] for r in p]),
            "bounded_tokens_per_s": summary([r["tokens_per_s"] for r in b]),
            "p99_improvement": summary([x["ttft_p99_s"] / y["ttft_p99_s"] for x, y in zip(p, b)]),
            "throughput_ratio": summary([y["tokens_per_s"] / x["tokens_per_s"] for x, y in zip(p, b)])}


def _timed(client: httpx.Client, url: str, seq: str) -> float:
    t0 = time.perf_counter()
    result = turn(url, client=client, prompt="hi there", seq_id=seq, max_tokens=1, temperature=0)
    elapsed = time.perf_counter() - t0
    if not result["ok"]:
        raise RuntimeError(result["error"])
    return elapsed


def same_owner(ring: HashRing, suffixes: Iterable[str], prefix: str = "tax") -> tuple[str, str]:
    """A fresh id whose `<id>-<suffix>` sequences all have one owner, and that owner: every path
    of a round goes to the same worker (with two workers, a random id's paths were on different
    workers in half the rounds, and the worker's own differences went into the tax)."""
    while True:
        seq = f"{prefix}-{uuid.uuid4().hex[:12]}"
        owners = {ring.owner(f"{seq}-{suffix}") for suffix in suffixes}
        if len(owners) == 1:
            return seq, owners.pop()


def scenario_routing_tax(out: Path, model_cache_dir: Path, pairs: int = TAX_PAIRS) -> dict:
    """Gateway minus direct, per round, on the default 2-worker cluster; and, as the
    measurement's noise floor, direct minus direct (a second direct request in each round)."""
    resolve_model_path(TAX_MODEL, model_cache_dir)
    env = _env(model_cache_dir, TAX_MODEL)
    with LocalCluster(num_workers=2, log_dir=out / "s10-tax" / "logs", worker_env=env) as cluster:
        ring = ring_of(cluster)
        workers = dict(zip(cluster.worker_names, cluster.worker_urls))
        client = httpx.Client(timeout=60, headers=cluster.internal_headers)  # direct: the gateway's token
        times: dict[str, list[float]] = {"gw": [], "direct": [], "direct2": []}
        for i in range(TAX_WARMUP + pairs):
            seq, owner = same_owner(ring, ("gw", "direct", "direct2"))
            order = [("gw", cluster.gateway_url), ("direct", workers[owner]), ("direct2", workers[owner])]
            for name, url in order[i % 3:] + order[:i % 3]:  # each one first in turn
                time.sleep(TAX_GAP_S)
                elapsed = _timed(client, url, f"{seq}-{name}")
                if i >= TAX_WARMUP:
                    times[name].append(elapsed)
        client.close()
    diffs = [g - d for g, d in zip(times["gw"], times["direct"])]
    noise = [d2 - d for d2, d in zip(times["direct2"], times["direct"])]
    return {"pairs": pairs, "gateway_p50_s": statistics.median(times["gw"]),
            "direct_p50_s": statistics.median(times["direct"]),
            "tax_p50_s": percentile(diffs, 50), "tax_p99_s": percentile(diffs, 99),
            "tax_mean_s": statistics.fmean(diffs), "gateway_p99_s": percentile(times["gw"], 99),
            "direct_p99_s": percentile(times["direct"], 99),
            "noise_p50_s": percentile(noise, 50), "noise_p99_s": percentile(noise, 99)}


def table_s9(r: dict) -> str:
    def f(s: dict, scale: float = 1000) -> str:
        return f"{s['median'] * scale:.0f} ({s['min'] * scale:.0f}-{s['max'] * scale:.0f})"
    return "\n".join([
        f"Scenario 9: {r['sessions']} conversations x {r['turns']} turns on {S9_WORKERS} workers, {r['hot']} of them "
        f"owned by one worker; plain ring vs bounded loads (factor {r['factor']}); medians of "
        f"{len(r['runs']['plain'])} runs (min-max).", "",
        "| | plain ring | bounded loads | ratio |", "|---|---|---|---|",
        f"| TTFT p99, ms | {f(r['plain_ttft_p99_s'])} | {f(r['bounded_ttft_p99_s'])} | "
        f"**{r['p99_improvement']['median']:.2f}x** better ({r['p99_improvement']['min']:.2f}-{r['p99_improvement']['max']:.2f}) |",
        f"| TTFT p50, ms | {f(r['plain_ttft_p50_s'])} | {f(r['bounded_ttft_p50_s'])} | |",
        f"| tokens/s | {f(r['plain_tokens_per_s'], 1)} | {f(r['bounded_tokens_per_s'], 1)} | "
        f"{r['throughput_ratio']['median']:.2f}x ({r['throughput_ratio']['min']:.2f}-{r['throughput_ratio']['max']:.2f}) |"])


def table_s10(r: dict) -> str:
    ms = 1000
    return (f"Scenario 10 (routing tax, {r['pairs']} rounds, {TAX_MODEL}, prompt 'hi there', max_tokens 1, streamed): "
            f"gateway minus direct p50 **{r['tax_p50_s'] * ms:.2f} ms**, p99 **{r['tax_p99_s'] * ms:.2f} ms** "
            f"(mean {r['tax_mean_s'] * ms:.2f}); noise floor (direct minus direct) p50 {r['noise_p50_s'] * ms:.2f} ms, "
            f"p99 {r['noise_p99_s'] * ms:.2f} ms; request p50 through the gateway {r['gateway_p50_s'] * ms:.1f} ms, "
            f"direct {r['direct_p50_s'] * ms:.1f} ms; p99 {r['gateway_p99_s'] * ms:.1f} vs {r['direct_p99_s'] * ms:.1f} ms "
            f"(p99 gateway - p99 direct **{(r['gateway_p99_s'] - r['direct_p99_s']) * ms:.2f} ms**).")
