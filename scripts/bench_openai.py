"""Scenario 8 of scripts/bench.py: stateless chat clients through the OpenAI API. Run it through
bench.py:

    .venv/bin/python scripts/bench.py --scenarios 8

  8. 2 workers, 32 chat sessions x 6 turns through the `openai` client, each turn resending the
     whole conversation (a system prompt of 512 tokens, 32-token user messages, 8 greedy tokens
     per answer), all 32 sessions at once. 8: one system prompt shared by all sessions (both
     routings find it cached: it is copied between conversations); 8b: each session has its own.
     The KV budget per worker (1536 MiB) holds the worker's share of the conversations under
     affinity, not every conversation twice: the cache binds, as a serving GPU's KV memory does.
     Session-affine routing (the gateway's default: the conversation's opening is the routing key)
     against round-robin
     (`GATEWAY_ROUTING=round_robin`). Figures: throughput (turns/s and total time) and the prefix
     hit rate in prompt tokens on turns 2-6 (`usage.prompt_tokens_details.cached_tokens` over
     `usage.prompt_tokens`).

Each run starts a fresh cluster (LocalCluster: real processes on loopback), alternating the
routing mode first, so neither mode always runs on a warmer machine.
"""

import os
import random
import statistics
import string
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai

from services.localcluster import LocalCluster
from services.worker.model.presets import resolve_model_path

MODEL = "gpt2-small-random"
SESSIONS = 32
TURNS = 6
SYSTEM_CHARS = 512   # characters = tokens with the presets' byte-level tokenizer (--s8-system-tokens)
USER_CHARS = 32
MAX_TOKENS = 8
# Per worker (--s8-kv-mib). A conversation ends near 990 tokens, ~73 MB of gpt2-small fp32 KV.
# Affinity gives a worker ~16 conversations (~1.2 GB): they fit. Round-robin has each worker cache
# parts of all 32 (~2.3 GB): they do not. 4096 holds both routings' sets (no eviction).
KV_MIB = 1536


def text(n: int, rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


@contextmanager
def environ(**values: str):
    """The gateway the cluster starts inherits this process's environment."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def chat_session(client: openai.OpenAI, system: str | int, rng: random.Random) -> list[dict]:
    """One conversation: every turn sends the whole history; returns each turn's usage. `system`
    is the shared system prompt, or the length of one of its own."""
    messages = [{"role": "system", "content": system if isinstance(system, str) else text(system, rng)}]
    turns = []
    for _ in range(TURNS):
        messages.append({"role": "user", "content": text(USER_CHARS, rng)})
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                               temperature=0)
        usage = reply.usage
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        turns.append({"prompt": usage.prompt_tokens, "cached": cached or 0,
                      "completion": usage.completion_tokens})
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    return turns


def one_run(out: Path, model_cache_dir: Path, routing: str, run: int, shared_system: bool, workers: int,
            system_tokens: int, kv_mib: int) -> dict:
    env = {"WORKER_MODEL_NAME": MODEL, "WORKER_MODEL_CACHE_DIR": str(model_cache_dir),
           "WORKER_KV_CACHE_BYTES": str(kv_mib << 20)}
    name = f"s8-{'shared' if shared_system else 'own'}-{workers}w-{system_tokens}sys-{kv_mib}mib-{routing}-run{run}"
    log_dir = out / name / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    with environ(GATEWAY_ROUTING=routing), LocalCluster(num_workers=workers, log_dir=log_dir, worker_env=env) as cluster:
        client = openai.OpenAI(base_url=f"{cluster.gateway_url}/v1", api_key="unused", max_retries=0,
                               timeout=600)
        rng = random.Random(run)
        system = text(system_tokens, rng) if shared_system else system_tokens  # shared by every session, or one each
        for i in range(3 * workers):  # the workers' first forwards, outside the measurement (likely both)
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"warm {i}"}],
                                           max_tokens=2, temperature=0, extra_headers={"X-Session-Id": f"warm-{i}"})
        seeds = [random.Random(run * 1000 + i) for i in range(SESSIONS)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(SESSIONS) as pool:
            sessions = list(pool.map(lambda r: chat_session(client, system, r), seeds))
        elapsed = time.perf_counter() - t0
    later = [t for s in sessions for t in s[1:]]
    prompt = sum(t["prompt"] for t in later)
    return {"routing": routing, "run": run, "seconds": elapsed, "turns": SESSIONS * TURNS,
            "turns_per_s": SESSIONS * TURNS / elapsed,
            "completion_tokens_per_s": sum(t["completion"] for s in sessions for t in s) / elapsed,
            "hit_rate_turns_2_6": sum(t["cached"] for t in later) / prompt,
            "prompt_tokens_turns_2_6": prompt,
            "computed_prompt_tokens": sum(t["prompt"] - t["cached"] for s in sessions for t in s),
            "first_turn_cached": [s[0]["cached"] for s in sessions]}


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def scenario_openai_chat(out: Path, model_cache_dir: Path, runs: int, shared_system: bool = True,
                         workers: int = 2, system_tokens: int = SYSTEM_CHARS, kv_mib: int = KV_MIB) -> dict:
    resolve_model_path(MODEL, model_cache_dir)  # build the preset once, before workers start
    rows: dict[str, list[dict]] = {"affinity": [], "round_robin": []}
    for run in range(runs):
        for routing in (("affinity", "round_robin") if run % 2 == 0 else ("round_robin", "affinity")):
            row = one_run(out, model_cache_dir, routing, run, shared_system, workers, system_tokens, kv_mib)
            rows[routing].append(row)
            print(f"  s8 run {run + 1} {routing}: {row['seconds']:.1f} s, {row['turns_per_s']:.2f} turns/s, "
                  f"hit rate turns 2-6 {row['hit_rate_turns_2_6'] * 100:.1f}%", flush=True)
    a, r = rows["affinity"], rows["round_robin"]
    return {
        "model": MODEL, "runs": runs, "shared_system": shared_system, "workers": workers, "sessions": SESSIONS, "turns": TURNS, "system_tokens": system_tokens,
        "kv_mib": kv_mib, "user_tokens": USER_CHARS, "max_tokens": MAX_TOKENS,
        "affinity_turns_per_s": summary([x["turns_per_s"] for x in a]),
        "round_robin_turns_per_s": summary([x["turns_per_s"] for x in r]),
        "speedup": summary([x["turns_per_s"] / y["turns_per_s"] for x, y in zip(a, r)]),
        "affinity_seconds": summary([x["seconds"] for x in a]),
        "round_robin_seconds": summary([x["seconds"] for x in r]),
        "affinity_hit_rate": summary([x["hit_rate_turns_2_6"] for x in a]),
        "round_robin_hit_rate": summary([x["hit_rate_turns_2_6"] for x in r]),
        # what round-robin's extra prefill is: its computed prompt tokens over affinity's, all turns
        "computed_ratio": summary([y["computed_prompt_tokens"] / x["computed_prompt_tokens"] for x, y in zip(a, r)]),
        "rows": rows,
    }


def _row(name: str, s: dict, target: str = "", scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
    f = lambda v: f"{v * scale:.{digits}f}{unit}"  # noqa: E731
    return f"| {name} | {f(s['min'])} | **{f(s['median'])}** | {f(s['max'])} | {target} |"


def table_s8(r: dict) -> str:
    pct = dict(scale=100, unit="%", digits=1)
    return "\n".join([
        f"8{'' if r.get('shared_system', True) else 'b'}. OpenAI chat clients resending their history: {r.get('workers', 2)} workers, "
        f"{r['sessions']} sessions x {r['turns']} turns at once through the `openai` client ({r['system_tokens']}-token "
        f"{'system prompt shared by all sessions' if r.get('shared_system', True) else 'system prompt of its own per session'}, "
        f"{r['user_tokens']}-token "
        f"user messages, {r['max_tokens']} greedy tokens), {r['model']}, KV budget {r.get('kv_mib', 2048)} MiB per worker, "
        f"{r['runs']} runs per routing mode.", "",
        "| figure | min | median | max | target |", "|---|---|---|---|---|",
        _row("affinity, turns/s", r["affinity_turns_per_s"]),
        _row("round-robin, turns/s", r["round_robin_turns_per_s"]),
        _row("throughput affinity / round-robin (per run pair)", r["speedup"], ">= 2x", unit="x"),
        _row("affinity, wall time", r["affinity_seconds"], unit=" s", digits=1),
        _row("round-robin, wall time", r["round_robin_seconds"], unit=" s", digits=1),
        _row("affinity, prefix hit rate on turns 2-6 (prompt tokens)", r["affinity_hit_rate"], ">= 80%", **pct),
        _row("round-robin, prefix hit rate on turns 2-6", r["round_robin_hit_rate"], **pct),
        *([_row("prompt tokens computed, round-robin / affinity (all turns)", r["computed_ratio"], unit="x")]
          if "computed_ratio" in r else []),
    ])
