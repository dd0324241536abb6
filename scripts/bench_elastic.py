"""Scenarios 6 and 7 of scripts/bench.py: elastic membership. Run them through bench.py:

    .venv/bin/python scripts/bench.py --scenarios 6,7

  6. time to first token of a continuation (~990 tokens of context + 16 new) right after its
     owner leaves: graceful drain (SIGTERM; the new owner pulls the KV) vs SIGKILL (the new owner
     recomputes from the session store), gpt2-small-random, 2 workers of one torch thread each.
  7. scale-out 2 -> 3 and scale-in 3 -> 2 under steady multi-turn load (8 client threads,
     tiny-gpt2, short prompts, 8 greedy tokens per turn): failed requests, lost
     histories, handoff tokens, client-side TTFT p50/p99 overall and around each change.

Each scenario starts its own clusters (LocalCluster: real processes on loopback, one SQLite
session store per cluster).
"""

import json
import math
import random
import re
import statistics
import string
import threading
import time
import uuid
from pathlib import Path

import httpx

from services.common.sse import parse_events
from services.localcluster import LocalCluster
from services.worker.model.presets import resolve_model_path

MODEL = "gpt2-small-random"
CLIENT = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
CACHED_CONTEXT = 990   # as in scenario 1: 989 prompt + 1 generated; then 16 new
NEW_TOKENS = 16
THINK_TIME_S = 0.5     # as in scenario 1: the worker writes the last generated token's KV meanwhile
KV_BYTES = str(2 << 30)

# Scenario 7: tiny-gpt2 (4 layers, 128 wide), so that 8 threads keep a few turns a second going on
# 2 cores and a new worker starts in seconds; the membership machinery is the same for any model.
S7_MODEL = "tiny-gpt2"
S7_THREADS = 8
S7_CONVERSATIONS_PER_THREAD = 4   # each thread takes turns on its conversations, round robin
S7_PROMPT = 12                    # characters = tokens (byte-level tokenizer)
S7_MAX_TOKENS = 8
S7_MAX_CONTEXT = 640              # then the thread starts a new conversation (GPT-2 window 1024)
S7_WINDOW_S = 5.0


def text(n: int, rng: random.Random) -> str:
    """n ASCII characters = n tokens with the presets' byte-level tokenizer."""
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def turn(url: str, token_times: list[float] | None = None, client: httpx.Client = CLIENT, **body) -> dict:
    """One streamed POST /generate that never raises: status, start, done, error, client TTFT.
    `token_times` gets the perf_counter() of every token event."""
    out = {"status": None, "start": None, "done": None, "error": None, "ttft_s": None}
    t0 = time.perf_counter()
    out["sent_s"] = t0
    try:
        with client.stream("POST", f"{url}/generate", json=body) as resp:
            out["status"] = resp.status_code
            if resp.status_code != 200:
                resp.read()
                out["error"] = f"HTTP {resp.status_code}: {resp.text[:300]}"
            else:
                for event in parse_events(resp.iter_lines()):
                    kind = event["type"]
                    if kind == "start":
                        out["start"] = event
                    elif kind == "token":
                        now = time.perf_counter()
                        if out["ttft_s"] is None:
                            out["ttft_s"] = now - t0
                        if token_times is not None:
                            token_times.append(now)
                    elif kind == "error":
                        out["error"] = event
                    elif kind == "done":
                        out["done"] = event
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["total_s"] = time.perf_counter() - t0
    if out["error"] is None and out["done"] is None:
        out["error"] = "stream ended without a done event"
    out["ok"] = out["error"] is None and out["start"] is not None
    return out


def summary(values: list[float]) -> dict:
    if not values:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def route(cluster: LocalCluster, seq: str) -> dict:
    return httpx.get(f"{cluster.coordinator_url}/route/{seq}", timeout=5).json()


def seq_owned_by(cluster: LocalCluster, worker: str, prefix: str) -> str:
    for _ in range(1000):
        seq = f"{prefix}-{uuid.uuid4().hex[:10]}"
        if route(cluster, seq)["worker_id"] == worker:
            return seq
    raise RuntimeError(f"no seq_id routed to {worker}")


def wait_route(cluster: LocalCluster, seq: str, worker: str, timeout_s: float = 30.0) -> tuple[dict, float]:
    t0 = time.perf_counter()
    while True:
        found = route(cluster, seq)
        if found.get("worker_id") == worker:
            return found, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout_s:
            raise TimeoutError(f"{seq} still routed to {found} after {timeout_s} s")
        time.sleep(0.02)


def fresh_dir(path: Path) -> Path:
    """A cluster's log dir; its session store is <path>/../sessions.db: start it empty."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("sessions.db", "sessions.db-wal", "sessions.db-shm"):
        (path.parent / name).unlink(missing_ok=True)
    return path


def pull_ms(log: Path, seq: str) -> float | None:
    """The receiving worker's own account of the KV pull ("pulled N positions of SEQ from W in X ms")."""
    try:
        found = re.findall(rf"pulled \d+ positions of {re.escape(seq)} from \S+ in (\d+) ms", log.read_text())
    except OSError:
        return None
    return float(found[-1]) if found else None


# --- scenario 6 ----------------------------------------------------------------------------

def _handoff_run(cluster: LocalCluster, mode: str, rng: random.Random) -> dict:
    """One run: a ~990-token conversation on worker-1, worker-1 leaves (mode "handoff": SIGTERM,
    it drains and serves the pull; mode "recompute": SIGKILL), the continuation goes to worker-0."""
    gw = cluster.gateway_url
    seq = seq_owned_by(cluster, "worker-1", f"s6{mode[0]}")
    first = turn(gw, prompt=text(CACHED_CONTEXT - 1, rng), seq_id=seq, max_tokens=1, temperature=0)
    if not first["ok"] or first["start"]["worker_id"] != "worker-1":
        raise RuntimeError(f"first turn: {first}")
    earlier = first["done"]["usage"]["context_tokens"] + first["done"]["usage"]["completion_tokens"]
    time.sleep(THINK_TIME_S)
    drained: dict = {}
    if mode == "handoff":
        def drain() -> None:
            t0 = time.perf_counter()
            drained["exit_code"] = cluster.drain("worker-1", timeout_s=120)
            drained["drain_s"] = time.perf_counter() - t0

        drainer = threading.Thread(target=drain)
        drainer.start()
    else:
        cluster.kill("worker-1")
    moved, waited = wait_route(cluster, seq, "worker-0")
    previous = [p["worker_id"] for p in moved.get("previous", [])]
    follow = turn(gw, prompt=text(NEW_TOKENS, rng), seq_id=seq, max_tokens=1, temperature=0)
    if mode == "handoff":
        drainer.join()
    if not follow["ok"]:
        raise RuntimeError(f"continuation: {follow}")
    start, done = follow["start"], follow["done"]
    expected_handoff = earlier if mode == "handoff" else 0
    row = {
        "seq_id": seq, "earlier_context": earlier, "route_wait_s": waited, "route_previous": previous,
        "worker": start["worker_id"], "context_tokens": start["context_tokens"],
        "cached_tokens": start["cached_tokens"], "handoff_tokens": start["handoff_tokens"],
        "client_ttft_s": follow["ttft_s"], "server_ttft_s": done["timings"]["ttft_ms"] / 1000,
        "server_prefill_s": done["timings"]["prefill_ms"] / 1000,
        "pull_s": (ms / 1000 if (ms := pull_ms(cluster.log_dir / "worker-0.log", seq)) is not None else None),
        "context_ok": start["context_tokens"] == earlier + NEW_TOKENS,
        "handoff_ok": start["handoff_tokens"] == expected_handoff and start["cached_tokens"] == expected_handoff
        and start["worker_id"] == "worker-0",
        **drained,
    }
    cluster.start_process("worker-1")
    cluster.wait_ready(180)
    return row


def scenario_handoff(out: Path, model_cache_dir: Path, runs: int, rng: random.Random) -> dict:
    """Scenario 6: continuation TTFT after the owner drains (KV pulled) vs is SIGKILLed (recomputed).
    One cluster; each run does both, alternating which goes first; worker-1 restarts after each."""
    resolve_model_path(MODEL, model_cache_dir)  # build the preset once, before workers start
    env = {"WORKER_MODEL_NAME": MODEL, "WORKER_MODEL_CACHE_DIR": str(model_cache_dir),
           "WORKER_KV_CACHE_BYTES": KV_BYTES, "WORKER_DRAIN_TIMEOUT_S": "30"}
    cluster = LocalCluster(num_workers=2, log_dir=fresh_dir(out / "s6" / "logs"), worker_env=env)
    rows: dict[str, list[dict]] = {"handoff": [], "recompute": []}
    with cluster:
        # Warm worker-0 (the receiver in both modes) with a short and a ~1000-token prefill;
        # nothing is left on worker-1, whose drain would otherwise wait for it to be pulled.
        for n in (64, CACHED_CONTEXT + NEW_TOKENS):
            turn(cluster.gateway_url, prompt=text(n, rng), seq_id=seq_owned_by(cluster, "worker-0", "warm"),
                 max_tokens=1, temperature=0)
        for i in range(runs):
            for mode in (("handoff", "recompute") if i % 2 == 0 else ("recompute", "handoff")):
                row = _handoff_run(cluster, mode, rng)
                rows[mode].append(row)
                print(f"  s6 run {i + 1} {mode}: client TTFT {row['client_ttft_s'] * 1000:.0f} ms, server "
                      f"{row['server_ttft_s'] * 1000:.0f} ms, cached {row['cached_tokens']}, handoff "
                      f"{row['handoff_tokens']}, route moved in {row['route_wait_s']:.2f} s", flush=True)
    h, r = rows["handoff"], rows["recompute"]
    pulls = [x["pull_s"] for x in h if x["pull_s"] is not None]
    return {
        "model": MODEL, "runs": runs, "torch_threads_per_worker": cluster._envs["worker-0"].get("WORKER_TORCH_THREADS"),
        "handoff_client_ttft": summary([x["client_ttft_s"] for x in h]),
        "recompute_client_ttft": summary([x["client_ttft_s"] for x in r]),
        "ratio": summary([b["client_ttft_s"] / a["client_ttft_s"] for a, b in zip(h, r)]),
        "handoff_server_ttft": summary([x["server_ttft_s"] for x in h]),
        "recompute_server_ttft": summary([x["server_ttft_s"] for x in r]),
        "server_ratio": summary([b["server_ttft_s"] / a["server_ttft_s"] for a, b in zip(h, r)]),
        "handoff_pull": summary(pulls),
        "handoff_tokens": summary([x["handoff_tokens"] for x in h]),
        "earlier_context": summary([x["earlier_context"] for x in h + r]),
        "recompute_route_wait": summary([x["route_wait_s"] for x in r]),
        "checks_failed": [f"{mode} run {i + 1}" for mode, xs in rows.items() for i, x in enumerate(xs)
                          if not (x["context_ok"] and x["handoff_ok"])],
        "drain_exit_codes": [x.get("exit_code") for x in h],
        "rows": rows,
    }


# --- scenario 7 ----------------------------------------------------------------------------

class Load:
    """S7_THREADS threads, each taking turns on S7_CONVERSATIONS_PER_THREAD conversations; after
    every turn, checks that the context grew by exactly the previous turn plus its prompt."""

    def __init__(self, url: str, seed: int):
        self.url, self.seed = url, seed
        self.records: list[dict] = []
        self.t0 = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(S7_THREADS)]

    def start(self) -> None:
        self.t0 = time.perf_counter()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)

        def new() -> dict:
            return {"seq": f"s7-{index}-{uuid.uuid4().hex[:10]}", "length": 0}

        conversations = [new() for _ in range(S7_CONVERSATIONS_PER_THREAD)]
        while not self._stop.is_set():
            for k, conv in enumerate(conversations):
                if self._stop.is_set():
                    return
                if conv["length"] > S7_MAX_CONTEXT:
                    conv = conversations[k] = new()
                prompt = text(S7_PROMPT, rng)
                r = turn(self.url, prompt=prompt, seq_id=conv["seq"], max_tokens=S7_MAX_TOKENS, temperature=0)
                expected = conv["length"] + len(prompt)
                rec = {"t": r["sent_s"] - self.t0, "ttft_s": r["ttft_s"], "ok": r["ok"], "error": r["error"],
                       "seq": conv["seq"], "expected_context": expected}
                if r["ok"]:
                    start = r["start"]
                    rec.update(worker=start["worker_id"], context=start["context_tokens"],
                               cached=start["cached_tokens"], handoff=start["handoff_tokens"],
                               lost=start["context_tokens"] != expected,
                               # a known conversation whose KV was neither here nor pulled: recomputed
                               recomputed=conv["length"] > 0 and start["cached_tokens"] < conv["length"])
                    if r["done"] is not None:
                        usage = r["done"]["usage"]
                        conv["length"] = usage["context_tokens"] + usage["completion_tokens"]
                else:  # its history is unknown now: go on with a new conversation
                    conversations[k] = new()
                self.records.append(rec)


def _window(records: list[dict], lo: float, hi: float) -> dict:
    ttfts = [r["ttft_s"] for r in records if lo <= r["t"] < hi and r["ok"] and r["ttft_s"] is not None]
    return {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99), "n": len(ttfts)}


def _scaling_run(out: Path, model_cache_dir: Path, run: int, seconds: float) -> dict:
    env = {"WORKER_MODEL_NAME": S7_MODEL, "WORKER_MODEL_CACHE_DIR": str(model_cache_dir),
           "WORKER_KV_CACHE_BYTES": KV_BYTES, "WORKER_DRAIN_TIMEOUT_S": "20"}
    cluster = LocalCluster(num_workers=2, log_dir=fresh_dir(out / f"s7-run{run}" / "logs"), worker_env=env)
    # Scale-out at 15/60 of `seconds`, scale-in at 35/60; but on 2 busy cores a new worker may take
    # longer than 20/60 to start (imports), so the scale-in waits until it has been on the ring
    # for 20/60, and the load goes on for 25/60 after the scale-in.
    out_at, in_at, three_for, after_in = (seconds * f / 60 for f in (15, 35, 20, 25))
    events: dict = {}
    with cluster:
        rng = random.Random(run)
        CLIENT.headers.update(cluster.internal_headers)  # the warm-up asks each worker directly
        for url in cluster.worker_urls:  # first forward of each worker, outside the measurement
            turn(url, prompt=text(S7_PROMPT, rng), seq_id=f"warm-{uuid.uuid4().hex[:8]}", max_tokens=2, temperature=0)
        load = Load(cluster.gateway_url, seed=run)
        load.start()
        now = lambda: time.perf_counter() - load.t0  # noqa: E731
        time.sleep(max(0.0, out_at - now()))
        events["scale_out_spawn_s"] = now()
        added = cluster.add_worker()
        events["scale_out_ready_s"] = now()
        time.sleep(max(0.0, max(in_at, events["scale_out_ready_s"] + three_for) - now()))

        def scale_in() -> None:
            events["scale_in_sigterm_s"] = now()
            events["drain_exit_code"] = cluster.remove_worker(added, timeout_s=120)
            events["scale_in_exit_s"] = now()

        remover = threading.Thread(target=scale_in)
        remover.start()
        time.sleep(max(0.0, max(seconds, events["scale_in_sigterm_s"] + after_in) - now()))
        load.stop()
        events["load_s"] = now()
        remover.join(timeout=180)
        stats = httpx.get(f"{cluster.gateway_url}/stats", timeout=10).json()
    records = load.records
    ok = [r for r in records if r["ok"]]
    ready, sigterm = events["scale_out_ready_s"], events["scale_in_sigterm_s"]
    return {
        "run": run, "added_worker": added, **events,
        "requests": len(records), "failed": len(records) - len(ok),
        "errors": sorted({str(r["error"])[:200] for r in records if not r["ok"]})[:10],
        "lost_histories": sum(r["lost"] for r in ok),
        "handoff_tokens": sum(r["handoff"] for r in ok),
        "handoff_turns": sum(1 for r in ok if r["handoff"]),
        "recomputed_turns": sum(r["recomputed"] for r in ok),
        "turns_per_worker": {w: sum(1 for r in ok if r["worker"] == w) for w in sorted({r["worker"] for r in ok})},
        "overall": _window(records, 0, math.inf),
        "before_scale_out": _window(records, 0, events["scale_out_spawn_s"]),
        "new_worker_starting": _window(records, events["scale_out_spawn_s"], ready),
        "around_scale_out": _window(records, ready - S7_WINDOW_S, ready + S7_WINDOW_S),
        "around_scale_in": _window(records, sigterm - S7_WINDOW_S, sigterm + S7_WINDOW_S),
        "worker_counters": {w: {k: v.get(k) for k in ("handoff_tokens", "hits", "misses", "evictions")}
                            for w, v in stats.get("workers", {}).items() if isinstance(v, dict)},
        "timeline": [[round(r["t"], 3), None if r["ttft_s"] is None else round(r["ttft_s"] * 1000, 1),
                      int(r["ok"]), r.get("handoff", 0)] for r in records],
    }


def scenario_scaling(out: Path, model_cache_dir: Path, runs: int, seconds: float) -> dict:
    """Scenario 7: scale-out at 15/60 and scale-in at 35/60 of `seconds` of steady load (later if the
    new worker starts late, see _scaling_run); a fresh cluster per run."""
    resolve_model_path(S7_MODEL, model_cache_dir)
    rows = []
    for run in range(runs):
        row = _scaling_run(out, model_cache_dir, run, seconds)
        rows.append(row)
        print(f"  s7 run {run + 1}: {row['requests']} requests, {row['failed']} failed, {row['lost_histories']} "
              f"lost, {row['handoff_tokens']} handoff tokens in {row['handoff_turns']} turns, p99 TTFT "
              f"{row['overall']['p99'] * 1000:.0f} ms (scale-out {_ms(row['around_scale_out']['p99'])}, scale-in "
              f"{_ms(row['around_scale_in']['p99'])}), drain exit {row.get('drain_exit_code')}", flush=True)
    timeline = {f"run{r['run']}": {k: r[k] for k in ("timeline", "scale_out_spawn_s", "scale_out_ready_s",
                                                    "scale_in_sigterm_s", "scale_in_exit_s")} for r in rows}
    (out / "s7-timeline.json").write_text(json.dumps(timeline))
    for r in rows:
        del r["timeline"]

    def fig(get) -> dict:
        return summary([v for v in (get(r) for r in rows) if v is not None])

    return {
        "model": S7_MODEL, "runs": runs, "seconds": seconds, "threads": S7_THREADS,
        "conversations": S7_THREADS * S7_CONVERSATIONS_PER_THREAD, "prompt_tokens": S7_PROMPT,
        "max_tokens": S7_MAX_TOKENS, "window_s": S7_WINDOW_S,
        "requests": fig(lambda r: r["requests"]), "failed": fig(lambda r: r["failed"]),
        "lost_histories": fig(lambda r: r["lost_histories"]), "handoff_tokens": fig(lambda r: r["handoff_tokens"]),
        "handoff_turns": fig(lambda r: r["handoff_turns"]), "recomputed_turns": fig(lambda r: r["recomputed_turns"]),
        "p50_overall": fig(lambda r: r["overall"]["p50"]), "p99_overall": fig(lambda r: r["overall"]["p99"]),
        "p50_before": fig(lambda r: r["before_scale_out"]["p50"]), "p99_before": fig(lambda r: r["before_scale_out"]["p99"]),
        "p50_starting": fig(lambda r: r["new_worker_starting"]["p50"]),
        "p99_starting": fig(lambda r: r["new_worker_starting"]["p99"]),
        "load_s": fig(lambda r: r["load_s"]),
        "p50_scale_out": fig(lambda r: r["around_scale_out"]["p50"]),
        "p99_scale_out": fig(lambda r: r["around_scale_out"]["p99"]),
        "p50_scale_in": fig(lambda r: r["around_scale_in"]["p50"]),
        "p99_scale_in": fig(lambda r: r["around_scale_in"]["p99"]),
        "add_worker_s": fig(lambda r: r["scale_out_ready_s"] - r["scale_out_spawn_s"]),
        "drain_s": fig(lambda r: r["scale_in_exit_s"] - r["scale_in_sigterm_s"] if "scale_in_exit_s" in r else None),
        "drain_exit_codes": [r.get("drain_exit_code") for r in rows],
        "rows": rows,
    }


# --- output --------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def _row(name: str, s: dict, target: str = "", scale: float = 1000, unit: str = " ms", digits: int = 0) -> str:
    if not s or s.get("n", 0) == 0:
        return f"| {name} | - | - | - | {target} |"
    f = lambda v: f"{v * scale:.{digits}f}{unit}"  # noqa: E731
    return f"| {name} | {f(s['min'])} | **{f(s['median'])}** | {f(s['max'])} | {target} |"


def table_s6(r: dict) -> str:
    count = dict(scale=1, unit="", digits=0)
    lines = [
        f"6. Continuation TTFT right after its owner leaves: {r['earlier_context']['median']:.0f} tokens of "
        f"context + {NEW_TOKENS} new, {r['model']}, 2 workers with {r['torch_threads_per_worker']} torch thread "
        f"each, {r['runs']} runs per mode (client-side through the gateway unless marked).", "",
        "| figure | min | median | max | target |", "|---|---|---|---|---|",
        _row("handoff (SIGTERM: drained worker serves the KV pull), client TTFT", r["handoff_client_ttft"]),
        _row("recompute (SIGKILL, route moved after the TTL), client TTFT", r["recompute_client_ttft"]),
        _row("ratio recompute / handoff (per run pair)", r["ratio"], ">= 5x", scale=1, unit="x", digits=1),
        _row("handoff, server `ttft_ms` (starts after the pull)", r["handoff_server_ttft"]),
        _row("recompute, server `ttft_ms`", r["recompute_server_ttft"]),
        _row("KV pull of the handoff (receiving worker's log)", r["handoff_pull"]),
        _row("handoff_tokens", r["handoff_tokens"], "= earlier context", **count),
    ]
    if r["checks_failed"]:
        lines.append(f"\nChecks failed (context, cached/handoff tokens or new owner): {', '.join(r['checks_failed'])}")
    return "\n".join(lines)


def table_s7(r: dict) -> str:
    count = dict(scale=1, unit="", digits=0)
    w = r["window_s"]
    lines = [
        f"7. Scale-out 2 -> 3 workers (`add_worker()`) at {r['seconds'] * 15 / 60:.0f} s of load, scale-in 3 -> 2 "
        f"(`remove_worker`: SIGTERM drain of the added worker) at {r['seconds'] * 35 / 60:.0f} s or once the new "
        f"worker has been on the ring for {r['seconds'] * 20 / 60:.0f} s if it started late, load until "
        f"{r['seconds']:.0f} s or {r['seconds'] * 25 / 60:.0f} s after the scale-in (median "
        f"{r.get('load_s', {}).get('median') or r['seconds']:.0f} s): {r['threads']} closed-loop client threads (no think time) on "
        f"{r['conversations']} multi-turn conversations ({r['prompt_tokens']}-token prompts, {r['max_tokens']} "
        f"greedy tokens, a new conversation past {S7_MAX_CONTEXT} tokens), {r['model']}, {r['runs']} runs; "
        f"client-side TTFT through the gateway. \"Around\" = requests sent within +-{w:.0f} s of the new worker "
        f"joining the ring / of the SIGTERM; \"starting\" = from `add_worker()` to the new worker on the ring.", "",
        "| figure | min | median | max | target |", "|---|---|---|---|---|",
        _row("requests", r["requests"], **count),
        _row("failed requests (non-200 or error event)", r["failed"], "0", **count),
        _row("lost histories", r["lost_histories"], "0", **count),
        _row("handoff tokens", r["handoff_tokens"], **count),
        _row("turns with a KV handoff", r["handoff_turns"], **count),
        _row("turns of a known conversation recomputed", r["recomputed_turns"], **count),
        _row("TTFT p50, overall", r["p50_overall"]), _row("TTFT p99, overall", r["p99_overall"]),
        _row("TTFT p50 before scale-out", r["p50_before"]),
        _row("TTFT p99 before scale-out", r["p99_before"]),
        _row("TTFT p50 while the new worker starts", r.get("p50_starting", {})),
        _row("TTFT p99 while the new worker starts", r.get("p99_starting", {})),
        _row("TTFT p50 around scale-out", r["p50_scale_out"]), _row("TTFT p99 around scale-out", r["p99_scale_out"]),
        _row("TTFT p50 around scale-in", r["p50_scale_in"]), _row("TTFT p99 around scale-in", r["p99_scale_in"]),
        _row("add_worker: spawn to on the ring", r["add_worker_s"], scale=1, unit=" s", digits=1),
        _row("drain of the removed worker: SIGTERM to exit", r["drain_s"], scale=1, unit=" s", digits=1),
    ]
    lines.append(f"\nDrain exit codes: {r['drain_exit_codes']}.")
    return "\n".join(lines)


def plot_s7(r: dict, timeline_path: Path, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = json.loads(timeline_path.read_text())
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 2.6 * len(runs)), sharex=True, squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items()):
        points = [(t, ms, ok, h) for t, ms, ok, h in run["timeline"] if ms is not None]
        ax.scatter([p[0] for p in points if not p[3]], [p[1] for p in points if not p[3]], s=4, c="tab:blue",
                   label="turn")
        ax.scatter([p[0] for p in points if p[3]], [p[1] for p in points if p[3]], s=14, c="tab:orange",
                   label="turn with a KV handoff")
        failed = [t for t, ms, ok, _ in run["timeline"] if not ok]
        if failed:
            ax.scatter(failed, [1] * len(failed), marker="x", c="red", label="failed")
        ax.axvspan(run["scale_out_spawn_s"], run["scale_out_ready_s"], color="tab:green", alpha=0.15,
                   label="new worker starting")
        ax.axvline(run["scale_out_ready_s"], color="tab:green", label="scale-out: joins the ring")
        ax.axvline(run["scale_in_sigterm_s"], color="tab:red", label="scale-in: SIGTERM (leaves the ring)")
        if run.get("scale_in_exit_s"):
            ax.axvline(run["scale_in_exit_s"], color="tab:red", ls="--", label="drained worker exits")
        ax.set_yscale("log")
        ax.set_ylabel(f"{name} TTFT (ms)")
    axes[0, 0].legend(fontsize=7, loc="upper left", ncol=3)
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.suptitle(f"7. client-side TTFT under load, scale-out 2->3 and scale-in 3->2 ({r['model']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
