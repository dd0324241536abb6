#!/usr/bin/env python3
"""Turn overhead: how long a cached continuation's `start` event takes to leave the worker.

Starts one worker on loopback (gpt2-small-random, no coordinator, no gateway; or uses --url, or
--cluster N for scripts/local_dev.sh's cluster behind its gateway) and sends sequences of two
turns: ~990 tokens (max_tokens 1), a pause, then 16 new tokens on the same seq_id (P1's shape).
For the second turn it prints p50/p90 of the client-side time from sending the request to
reading `start`, and to reading the first token (both include loopback HTTP), once per pause:
0 s (an agent's next turn, sent on `done`) and 0.5 s (P1's think time).

    .venv/bin/python scripts/turn_overhead.py               # 2 x 15 continuations, ~1.5 min
    KVCACHE_INTERNAL_TOKEN=... .venv/bin/python scripts/turn_overhead.py --reps 40 --think-s 0 --url http://127.0.0.1:8082
"""

import argparse
import json
import os
import random
import statistics
import string
import sys
import time
import uuid
from pathlib import Path

import httpx
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.auth import bearer_headers  # noqa: E402
from services.common.sse import parse_events  # noqa: E402
from services.localcluster import LocalCluster  # noqa: E402
from services.worker.model.presets import resolve_model_path  # noqa: E402

MODEL = "gpt2-small-random"
CACHED_CONTEXT = 990
NEW_TOKENS = 16


def text(n: int, rng: random.Random) -> str:
    """n ASCII characters = n tokens with the byte-level tokenizer."""
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def turn(client: httpx.Client, url: str, **body) -> dict:
    """One /generate stream: client-side seconds to `start` and to the first token, and `done`."""
    out = {}
    t0 = time.perf_counter()
    with client.stream("POST", f"{url}/generate", json=body) as resp:
        resp.raise_for_status()
        for event in parse_events(resp.iter_lines()):
            now = time.perf_counter() - t0
            if event["type"] == "start":
                out["start_s"] = now
            elif event["type"] == "token" and "token_s" not in out:
                out["token_s"] = now
            elif event["type"] == "error":
                raise RuntimeError(event)
            elif event["type"] == "done":
                return {**out, "done": event}
    raise RuntimeError("stream ended without done")


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "min_ms": 1000 * ordered[0], "max_ms": 1000 * ordered[-1], "n": len(ordered)}


def measure(url: str, reps: int, think_s: float, rng: random.Random, headers: dict[str, str]) -> dict:
    rows = {"start": [], "first_token": [], "server_ttft": []}
    with httpx.Client(timeout=120, headers=headers) as client:
        turn(client, url, prompt=text(64, rng), max_tokens=4, temperature=0)  # warm-up
        time.sleep(0.5)
        for _ in range(reps):
            seq = f"overhead-{uuid.uuid4().hex[:10]}"
            turn(client, url, prompt=text(CACHED_CONTEXT - 1, rng), seq_id=seq, max_tokens=1, temperature=0)
            time.sleep(think_s)
            r = turn(client, url, prompt=text(NEW_TOKENS, rng), seq_id=seq, max_tokens=1, temperature=0)
            if r["done"]["usage"]["cached_tokens"] < CACHED_CONTEXT - 1:
                raise RuntimeError(f"continuation was not cached: {r['done']['usage']}")
            rows["start"].append(r["start_s"])
            rows["first_token"].append(r["token_s"])
            rows["server_ttft"].append(r["done"]["timings"]["ttft_ms"] / 1000)
    return {k: percentiles(v) for k, v in rows.items()}


def measure_all(url: str, args: argparse.Namespace, rng: random.Random, headers: dict[str, str]) -> dict:
    return {f"think_{t:g}s": measure(url, args.reps, t, rng, headers) for t in args.think_s}


def report(results: dict) -> str:
    names = {"start": "request -> start (client)", "first_token": "request -> first token (client)",
             "server_ttft": "engine ttft_ms (server)"}
    lines = []
    for think, result in results.items():
        lines.append(f"continuation after a pause of {think.removeprefix('think_')}:")
        lines += [f"  {names[k]:34s} p50 {r['p50_ms']:7.1f} ms  p90 {r['p90_ms']:7.1f} ms  "
                  f"(min {r['min_ms']:.1f}, max {r['max_ms']:.1f}, n {r['n']})" for k, r in result.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15, help="continuations measured per pause")
    parser.add_argument("--think-s", type=lambda v: [float(x) for x in v.split(",")], default=[0.0, 0.5],
                        help="pauses between the two turns, comma-separated (default 0,0.5)")
    parser.add_argument("--url", help="an already running worker or gateway (default: start one worker)")
    parser.add_argument("--cluster", type=int, metavar="N",
                        help="start scripts/local_dev.sh's cluster (N workers, gateway) and go through the gateway")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "kvcache" / "models")
    args = parser.parse_args()
    rng = random.Random(0)
    if args.url:
        token = SecretStr(os.environ.get("KVCACHE_INTERNAL_TOKEN", ""))  # a worker's routes need it
        result = measure_all(args.url, args, rng, bearer_headers(token))
    else:
        resolve_model_path(MODEL, args.model_cache_dir)
        env = {"WORKER_MODEL_NAME": MODEL, "WORKER_MODEL_CACHE_DIR": str(args.model_cache_dir),
               "WORKER_KV_CACHE_BYTES": str(4 << 30)}
        log_dir = ROOT / "bench_results" / "logs-turn-overhead"
        whole = args.cluster is not None
        with LocalCluster(num_workers=args.cluster or 1, log_dir=log_dir, worker_env=env, start_gateway=whole,
                          start_coordinator=whole) as cluster:
            url = cluster.gateway_url if whole else cluster.worker_urls[0]
            # A worker asked directly wants the internal token, as from the gateway.
            result = measure_all(url, args, rng, {} if whole else cluster.internal_headers)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
