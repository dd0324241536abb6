"""Scenarios 11-13 of scripts/bench.py: the KV tiers. Run them through bench.py:

    .venv/bin/python scripts/bench.py --scenarios 11,12,13

 11. revisit: 32 conversations of ~600 tokens on 2 gpt2-small-random workers whose device KV
     budget (WORKER_KV_CACHE_BYTES=400000000) holds about 16 of them, then revisited round-robin
     (16 new tokens each): share of the returning history served from a tier, and revisit TTFT,
     with tiers and without (recompute).
 12. crash: 20 conversations of ~600 tokens on worker-1, which is SIGKILLed; each continues on
     worker-0: how many load their whole history (cached_tokens >= the earlier history), and TTFT,
     with tiers and without.
 13. capacity: multi-turn chat (4 client threads, 32 conversations, 4 turns each) whose working
     set is about 4x the cluster's device KV: turns/s and TTFT p50/p99, with tiers and without.

Each run starts its own LocalCluster (real processes on loopback) with a fresh session store and
fresh tier directories; "without" sets WORKER_KV_TIERS=false, nothing else changes.
"""

import random
import shutil
import threading
import time
from pathlib import Path

from bench_elastic import MODEL, percentile, seq_owned_by, summary, text, turn

from services.localcluster import LocalCluster
from services.worker.model.presets import resolve_model_path

PROMPT_TOKENS = 600
NEW_TOKENS = 16
S11_CONVERSATIONS = 32
S11_KV_BYTES = "400000000"
S12_CONVERSATIONS = 20
S12_KV_BYTES = str(2 << 30)
S13_THREADS = 4
S13_CONVERSATIONS = 32
S13_TURNS = 4
S13_FIRST_PROMPT = 400
S13_KV_BYTES = "110000000"  # ~1500 positions per worker: the 32 conversations' ~500 need 4x


def _cluster(out: Path, name: str, model_cache_dir: Path, tiers: bool, kv_bytes: str) -> LocalCluster:
    root = out / name
    shutil.rmtree(root, ignore_errors=True)
    (root / "logs").mkdir(parents=True)
    env = {"WORKER_MODEL_NAME": MODEL, "WORKER_MODEL_CACHE_DIR": str(model_cache_dir),
           "WORKER_KV_CACHE_BYTES": kv_bytes, "WORKER_KV_TIERS": str(tiers).lower()}
    return LocalCluster(num_workers=2, log_dir=root / "logs", worker_env=env).start(timeout_s=300)


def _ok(result: dict, what: str) -> dict:
    if not result["ok"]:
        raise RuntimeError(f"{what}: {result}")
    return result


def _history(result: dict) -> int:
    usage = result["done"]["usage"]
    return usage["context_tokens"] + usage["completion_tokens"]


def _both_modes(label: str, run, out: Path, model_cache_dir: Path, runs: int, rng: random.Random) -> dict:
    """`runs` runs of each mode, alternating: with tiers, then without (recompute)."""
    resolve_model_path(MODEL, model_cache_dir)  # build the preset once, before workers start
    result = {"tiers": [], "recompute": []}
    for i in range(runs):
        for mode in ("tiers", "recompute"):
            row = run(out, model_cache_dir, mode == "tiers", rng)
            print(f"  {label} run {i + 1} {mode}: {row}", flush=True)
            result[mode].append(row)
    return result


# --- scenario 11 ---------------------------------------------------------------------------
def _revisit_run(out: Path, model_cache_dir: Path, tiers: bool, rng: random.Random) -> dict:
    with _cluster(out, f"s11-{'tiers' if tiers else 'recompute'}", model_cache_dir, tiers, S11_KV_BYTES) as cluster:
        gw = cluster.gateway_url
        seqs = [f"s11-{rng.getrandbits(40):010x}" for _ in range(S11_CONVERSATIONS)]
        earlier = {}
        for seq in seqs:
            first = _ok(turn(gw, prompt=text(PROMPT_TOKENS, rng), seq_id=seq, max_tokens=8, temperature=0), "first")
            earlier[seq] = _history(first)
        time.sleep(1.0)  # the last tier writes
        rows = []
        for seq in seqs:
            again = _ok(turn(gw, prompt=text(NEW_TOKENS, rng), seq_id=seq, max_tokens=1, temperature=0), "revisit")
            rows.append({"earlier": earlier[seq], "cached": again["start"]["cached_tokens"],
                         "tier": again["start"].get("tier_tokens", 0), "ttft_s": again["ttft_s"]})
    history = sum(r["earlier"] for r in rows)
    return {"from_tier_share": sum(r["tier"] for r in rows) / history,
            "cached_share": sum(r["cached"] for r in rows) / history,
            "ttft_p50_s": percentile([r["ttft_s"] for r in rows], 50),
            "ttft_p99_s": percentile([r["ttft_s"] for r in rows], 99)}


def scenario_revisit(out: Path, model_cache_dir: Path, runs: int, rng: random.Random) -> dict:
    return _both_modes("s11", _revisit_run, out, model_cache_dir, runs, rng)


def table_s11(r: dict) -> str:
    t, c = r["tiers"], r["recompute"]
    speedup = [b["ttft_p50_s"] / a["ttft_p50_s"] for a, b in zip(t, c)]
    return "\n".join([
        "Scenario 11 (revisit, 32 conversations of ~600 tokens, device KV for ~16, gpt2-small-random, "
        f"{len(t)} runs; min/median/max):", "",
        "| | with tiers | without (recompute) |", "|---|---|---|",
        f"| returning history served from a tier | {_mmm([x['from_tier_share'] for x in t], pct=True)} | "
        f"{_mmm([x['from_tier_share'] for x in c], pct=True)} |",
        f"| returning history cached (any source) | {_mmm([x['cached_share'] for x in t], pct=True)} | "
        f"{_mmm([x['cached_share'] for x in c], pct=True)} |",
        f"| revisit TTFT p50 | {_mmm([x['ttft_p50_s'] * 1000 for x in t])} ms | "
        f"{_mmm([x['ttft_p50_s'] * 1000 for x in c])} ms |",
        f"| revisit TTFT p99 | {_mmm([x['ttft_p99_s'] * 1000 for x in t])} ms | "
        f"{_mmm([x['ttft_p99_s'] * 1000 for x in c])} ms |",
        f"| recompute / tiers TTFT p50 | {_mmm(speedup, digits=1)}x | |"])


# --- scenario 12 ---------------------------------------------------------------------------
def _crash_run(out: Path, model_cache_dir: Path, tiers: bool, rng: random.Random) -> dict:
    with _cluster(out, f"s12-{'tiers' if tiers else 'recompute'}", model_cache_dir, tiers, S12_KV_BYTES) as cluster:
        gw = cluster.gateway_url
        seqs = [seq_owned_by(cluster, "worker-1", "s12") for _ in range(S12_CONVERSATIONS)]
        earlier = {}
        for seq in seqs:
            first = _ok(turn(gw, prompt=text(PROMPT_TOKENS, rng), seq_id=seq, max_tokens=8, temperature=0), "first")
            assert first["start"]["worker_id"] == "worker-1"
            earlier[seq] = _history(first)
        time.sleep(1.0)  # the write-behind of the last turn (a real crash can come sooner)
        cluster.kill("worker-1")
        rows = []
        for seq in seqs:
            follow = _ok(turn(gw, prompt=text(NEW_TOKENS, rng), seq_id=seq, max_tokens=1, temperature=0), "continue")
            rows.append({"earlier": earlier[seq], "cached": follow["start"]["cached_tokens"],
                         "tier": follow["start"].get("tier_tokens", 0), "ttft_s": follow["ttft_s"],
                         "worker": follow["start"]["worker_id"]})
    return {"restored": sum(r["cached"] >= r["earlier"] for r in rows), "conversations": len(rows),
            "moved": sum(r["worker"] == "worker-0" for r in rows),
            "ttft_p50_s": percentile([r["ttft_s"] for r in rows], 50),
            "ttft_p99_s": percentile([r["ttft_s"] for r in rows], 99)}


def scenario_crash(out: Path, model_cache_dir: Path, runs: int, rng: random.Random) -> dict:
    return _both_modes("s12", _crash_run, out, model_cache_dir, runs, rng)


def table_s12(r: dict) -> str:
    t, c = r["tiers"], r["recompute"]
    return "\n".join([
        f"Scenario 12 (crash: SIGKILL of a worker holding {S12_CONVERSATIONS} conversations of ~600 tokens, "
        f"gpt2-small-random, {len(t)} runs; min/median/max):", "",
        "| | with tiers | without (recompute) |", "|---|---|---|",
        f"| continued with their whole history loaded | {_mmm([x['restored'] for x in t])} of {S12_CONVERSATIONS} | "
        f"{_mmm([x['restored'] for x in c])} of {S12_CONVERSATIONS} |",
        f"| continuation TTFT p50 | {_mmm([x['ttft_p50_s'] * 1000 for x in t])} ms | "
        f"{_mmm([x['ttft_p50_s'] * 1000 for x in c])} ms |",
        f"| continuation TTFT p99 | {_mmm([x['ttft_p99_s'] * 1000 for x in t])} ms | "
        f"{_mmm([x['ttft_p99_s'] * 1000 for x in c])} ms |"])


# --- scenario 13 ---------------------------------------------------------------------------
def _capacity_run(out: Path, model_cache_dir: Path, tiers: bool, rng: random.Random) -> dict:
    with _cluster(out, f"s13-{'tiers' if tiers else 'recompute'}", model_cache_dir, tiers, S13_KV_BYTES) as cluster:
        gw = cluster.gateway_url
        convs = [f"s13-{rng.getrandbits(40):010x}" for _ in range(S13_CONVERSATIONS)]
        prompts = {c: [text(S13_FIRST_PROMPT, rng)] + [text(NEW_TOKENS * 2, rng) for _ in range(S13_TURNS - 1)]
                   for c in convs}
        results, lock = [], threading.Lock()

        def client(mine: list[str]) -> None:
            for t in range(S13_TURNS):
                for conv in mine:  # round robin over this thread's conversations
                    r = turn(gw, prompt=prompts[conv][t], seq_id=conv, max_tokens=NEW_TOKENS, temperature=0)
                    with lock:
                        results.append({**r, "turn": t})

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(convs[i::S13_THREADS],)) for i in range(S13_THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - started
    ok = [r for r in results if r["ok"]]
    later = [r["ttft_s"] for r in ok if r["turn"] > 0]
    return {"turns": len(results), "errors": len(results) - len(ok), "turns_per_s": len(ok) / elapsed,
            "ttft_p50_s": percentile(later, 50), "ttft_p99_s": percentile(later, 99),
            "tier_tokens": sum(r["start"].get("tier_tokens", 0) for r in ok),
            "cached_tokens": sum(r["start"]["cached_tokens"] for r in ok)}


def scenario_capacity(out: Path, model_cache_dir: Path, runs: int, rng: random.Random) -> dict:
    return _both_modes("s13", _capacity_run, out, model_cache_dir, runs, rng)


def table_s13(r: dict) -> str:
    t, c = r["tiers"], r["recompute"]
    return "\n".join([
        f"Scenario 13 (capacity: {S13_THREADS} threads, {S13_CONVERSATIONS} conversations x {S13_TURNS} turns, "
        f"working set ~4x the device KV, gpt2-small-random, {len(t)} runs; min/median/max):", "",
        "| | with tiers | without (recompute) |", "|---|---|---|",
        f"| turns/s | {_mmm([x['turns_per_s'] for x in t], digits=2)} | {_mmm([x['turns_per_s'] for x in c], digits=2)} |",
        f"| TTFT p50, turns 2-{S13_TURNS} | {_mmm([x['ttft_p50_s'] * 1000 for x in t])} ms | "
        f"{_mmm([x['ttft_p50_s'] * 1000 for x in c])} ms |",
        f"| TTFT p99, turns 2-{S13_TURNS} | {_mmm([x['ttft_p99_s'] * 1000 for x in t])} ms | "
        f"{_mmm([x['ttft_p99_s'] * 1000 for x in c])} ms |",
        f"| errors | {_mmm([x['errors'] for x in t])} | {_mmm([x['errors'] for x in c])} |",
        f"| context tokens loaded from tiers | {_mmm([x['tier_tokens'] for x in t])} | "
        f"{_mmm([x['tier_tokens'] for x in c])} |"])


def _mmm(values: list[float], pct: bool = False, digits: int = 0) -> str:
    s = summary(values)
    if s["n"] == 0:
        return "-"
    f = (lambda v: f"{v * 100:.1f}%") if pct else (lambda v: f"{v:.{digits}f}")
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})" if s["n"] > 1 else f(s["median"])
