#!/usr/bin/env python3
"""A load run a person can watch: N concurrent multi-turn conversations for a fixed time through
the gateway's streaming `/generate` (seq_id turns, back to back, no think time), with a progress
bar, optionally scaling the local cluster out and in mid-run.

    .venv/bin/python scripts/load_run.py --sessions 8 --duration 60 --scale-out-at 20 --scale-in-at 40
    .venv/bin/python scripts/bench.py --load-run --sessions 8 --duration 60   # the same
    .venv/bin/python scripts/load_run.py --gateway-url http://127.0.0.1:8080 --sessions 4 --duration 30
    .venv/bin/python scripts/load_run.py --replot bench_results/load_run.json  # the PNG again

Without --gateway-url it starts a LocalCluster (default 2 workers, tiny-gpt2). Writes
<out>/load_run.json (config, scale events, summary, per-second series, every turn) and
<out>/load_run.png (TTFT and inter-token latency over time, throughput, prefix hit rate, with the
scale events marked), and prints a summary table. Hit rate = cached_tokens / context_tokens of
the `done` event's usage (for a seq_id turn `prompt_tokens` counts only the new prompt).
"""

import argparse
import json
import math
import random
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_elastic import CLIENT, fresh_dir, percentile, summary, text, turn  # noqa: E402
from services.localcluster import LocalCluster  # noqa: E402

DEFAULT_MODEL = "tiny-gpt2"  # scenario 7's: a new worker starts in seconds on 2 cores
MIN_PHASE_S = 0.05            # shorter: two events at once (a worker drained as soon as it joined)


@dataclass(frozen=True)
class LoadConfig:
    sessions: int = 8
    duration_s: float = 60.0
    prompt_tokens: int = 12        # characters = tokens (the presets' byte-level tokenizer)
    max_tokens: int = 16
    max_context: int = 640         # then the session starts a new conversation (GPT-2 window 1024)
    window_s: int = 5              # of the rolling percentiles
    scale_out_at_s: float | None = None
    scale_in_at_s: float | None = None
    workers: int = 2
    model: str | None = DEFAULT_MODEL  # of the local cluster
    gateway_url: str | None = None
    seed: int = 0

    def __post_init__(self):
        if self.sessions < 1 or self.duration_s <= 0 or self.window_s < 1:
            raise ValueError("sessions and window_s must be >= 1 and duration_s > 0")
        if self.prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError("prompt_tokens and max_tokens must be >= 1")
        scales = [t for t in (self.scale_out_at_s, self.scale_in_at_s) if t is not None]
        if scales and self.gateway_url:
            raise ValueError("scaling needs the local cluster: no --gateway-url")
        if any(not 0 <= t < self.duration_s for t in scales):
            raise ValueError("scale times must fall within the run")
        if len(scales) == 2 and self.scale_in_at_s <= self.scale_out_at_s:
            raise ValueError("the scale-in must come after the scale-out")
        if self.scale_in_at_s is not None and self.scale_out_at_s is None and self.workers < 2:
            raise ValueError("a scale-in without a scale-out needs 2 workers or more")


# --- pure: records -> series, summary, plot ------------------------------------------------

def turn_record(r: dict, t0: float, token_times: list[float], session: int, seq_id: str) -> dict:
    """One turn from bench_elastic.turn()'s result; times in seconds since the run's start."""
    rec = {"session": session, "seq_id": seq_id, "t": round(r["sent_s"] - t0, 6),
           "end_s": round(r["sent_s"] - t0 + r["total_s"], 6),
           "ttft_s": None if r["ttft_s"] is None else round(r["ttft_s"], 6),
           "itl_s": [round(b - a, 6) for a, b in zip(token_times, token_times[1:])],
           "tokens": len(token_times), "error": None if r["ok"] else str(r["error"])[:300],
           "worker": (r["start"] or {}).get("worker_id")}
    usage = (r["done"] or {}).get("usage") or {}
    for key in ("prompt_tokens", "cached_tokens", "context_tokens", "handoff_tokens"):
        rec[key] = usage.get(key)
    return rec


def token_arrivals(rec: dict) -> list[tuple[float, float | None]]:
    """(seconds since the start, gap to the previous token or None for the first) per token."""
    if rec["ttft_s"] is None:
        return []
    t = rec["t"] + rec["ttft_s"]
    out: list[tuple[float, float | None]] = [(t, None)]
    for gap in rec["itl_s"]:
        t += gap
        out.append((t, gap))
    return out


def stats(values: list[float]) -> dict:
    return {**summary(values), "p50": percentile(values, 50), "p99": percentile(values, 99)}


def _hit_rate(records: list[dict]) -> float | None:
    context = sum(r["context_tokens"] or 0 for r in records)
    return sum(r["cached_tokens"] or 0 for r in records) / context if context else None


def window_stats(records: list[dict], lo: float, hi: float) -> dict:
    """Turns sent in [lo, hi) (TTFT, errors, hit rate) and tokens that arrived in it (ITL, tokens/s)."""
    sent = [r for r in records if lo <= r["t"] < hi]
    arrivals = [a for r in records for a in token_arrivals(r) if lo <= a[0] < hi]
    span = max(hi - lo, 1e-9)
    return {"from_s": lo, "to_s": hi, "turns": len(sent), "errors": sum(1 for r in sent if r["error"]),
            "tokens": len(arrivals), "tokens_per_s": len(arrivals) / span,
            "turns_per_s": sum(1 for r in records if lo <= r["end_s"] < hi and not r["error"]) / span,
            "ttft_ms": stats([r["ttft_s"] * 1000 for r in sent if r["ttft_s"] is not None]),
            "itl_ms": stats([gap * 1000 for _, gap in arrivals if gap is not None]),
            "hit_rate": _hit_rate([r for r in sent if not r["error"]])}


def per_second(records: list[dict], end_s: float, window_s: int) -> list[dict]:
    """One row per second: turns started/finished, errors, tokens arrived, TTFT (turns sent that
    second) and ITL (gaps ending that second) p50/p99, the same over a trailing window, hit rate,
    handoff tokens and turns per worker of the turns finished that second."""
    n = max(1, math.ceil(end_s))
    at = lambda t: min(n - 1, max(0, int(t)))  # noqa: E731
    rows = [{"t": s, "turns_started": 0, "turns_done": 0, "errors": 0, "tokens": 0, "cached_tokens": 0,
             "context_tokens": 0, "handoff_tokens": 0, "turns_by_worker": {}} for s in range(n)]
    ttft: list[list[float]] = [[] for _ in range(n)]
    itl: list[list[float]] = [[] for _ in range(n)]
    for r in records:
        rows[at(r["t"])]["turns_started"] += 1
        if r["ttft_s"] is not None:
            ttft[at(r["t"])].append(r["ttft_s"] * 1000)
        for t, gap in token_arrivals(r):
            rows[at(t)]["tokens"] += 1
            if gap is not None:
                itl[at(t)].append(gap * 1000)
        done = rows[at(r["end_s"])]
        done["errors" if r["error"] else "turns_done"] += 1
        if not r["error"]:
            for key in ("cached_tokens", "context_tokens", "handoff_tokens"):
                done[key] += r[key] or 0
            done["turns_by_worker"][r["worker"]] = done["turns_by_worker"].get(r["worker"], 0) + 1
    for s, row in enumerate(rows):
        recent = range(max(0, s + 1 - window_s), s + 1)
        rolling_ttft = [v for i in recent for v in ttft[i]]
        rolling_itl = [v for i in recent for v in itl[i]]
        row.update(ttft_p50_ms=percentile(ttft[s], 50), ttft_p99_ms=percentile(ttft[s], 99),
                   itl_p50_ms=percentile(itl[s], 50), itl_p99_ms=percentile(itl[s], 99),
                   ttft_rolling_p50_ms=percentile(rolling_ttft, 50), ttft_rolling_p99_ms=percentile(rolling_ttft, 99),
                   itl_rolling_p50_ms=percentile(rolling_itl, 50), itl_rolling_p99_ms=percentile(rolling_itl, 99),
                   hit_rate=row["cached_tokens"] / row["context_tokens"] if row["context_tokens"] else None)
    return rows


def phases(records: list[dict], events: list[dict], end_s: float) -> list[dict]:
    """window_stats between consecutive scale events (the whole run when there is none); events
    after the end (a drain that outlasts the load) bound no phase."""
    marks = sorted((e for e in events if e["t"] < end_s), key=lambda e: e["t"])
    bounds = [0.0, *(e["t"] for e in marks), end_s]
    names = ["start", *(e["label"] for e in marks), "end"]
    return [{"phase": f"{names[i]} -> {names[i + 1]}", **window_stats(records, bounds[i], bounds[i + 1])}
            for i in range(len(bounds) - 1) if bounds[i + 1] - bounds[i] >= MIN_PHASE_S]


def summarize(records: list[dict], events: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if not r["error"]]
    overall = window_stats(records, 0.0, math.inf)
    workers: dict[str, int] = {}
    for r in ok:
        workers[r["worker"]] = workers.get(r["worker"], 0) + 1
    return {"wall_s": wall_s, "turns": len(records), "turns_ok": len(ok), "errors": len(records) - len(ok),
            "error_kinds": sorted({r["error"][:120] for r in records if r["error"]})[:10],
            "tokens": overall["tokens"], "tokens_per_s": overall["tokens"] / wall_s if wall_s else None,
            "turns_per_s": len(ok) / wall_s if wall_s else None,
            "ttft_ms": overall["ttft_ms"], "itl_ms": overall["itl_ms"],
            "tokens_per_turn": stats([r["tokens"] for r in ok]),
            "hit_rate": overall["hit_rate"],
            "handoff_tokens": sum(r["handoff_tokens"] or 0 for r in ok),
            "handoff_turns": sum(1 for r in ok if r["handoff_tokens"]),
            "turns_per_worker": dict(sorted(workers.items(), key=lambda kv: str(kv[0]))),
            "phases": phases(records, events, wall_s)}


def build_result(config: LoadConfig, records: list[dict], events: list[dict], wall_s: float) -> dict:
    end_s = max([wall_s, *(r["end_s"] for r in records)])
    return {"config": asdict(config), "events": sorted(events, key=lambda e: e["t"]),
            "summary": summarize(records, events, end_s), "series": per_second(records, end_s, config.window_s),
            "turns": records}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def table(result: dict) -> str:
    s = result["summary"]
    rate = lambda v: "-" if v is None else f"{v * 100:.1f}%"  # noqa: E731
    lines = [f"{s['turns']} turns ({s['errors']} failed), {s['tokens']} tokens in {s['wall_s']:.1f} s: "
             f"{s['tokens_per_s']:.1f} tokens/s, {s['turns_per_s']:.2f} turns/s; prefix hit rate "
             f"{rate(s['hit_rate'])}; {s['handoff_tokens']} handoff tokens in {s['handoff_turns']} turns",
             "", "| ms | min | p50 | p99 | max | n |", "|---|---|---|---|---|---|"]
    for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms")):
        v = s[key]
        lines.append(f"| {name} | {_ms(v['min'])} | {_ms(v['p50'])} | {_ms(v['p99'])} | {_ms(v['max'])} | {v['n']} |")
    lines += ["", "| phase | s | turns | errors | tokens/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | hit rate |",
              "|---|---|---|---|---|---|---|---|"]
    for p in s["phases"]:
        lines.append(f"| {p['phase']} | {p['from_s']:.1f}-{p['to_s']:.1f} | {p['turns']} | {p['errors']} | "
                     f"{p['tokens_per_s']:.1f} | {_ms(p['ttft_ms']['p50'])} / {_ms(p['ttft_ms']['p99'])} | "
                     f"{_ms(p['itl_ms']['p50'])} / {_ms(p['itl_ms']['p99'])} | {rate(p['hit_rate'])} |")
    if s["error_kinds"]:
        lines += ["", "errors: " + "; ".join(s["error_kinds"])]
    return "\n".join(lines)


EVENT_STYLE = {"scale_out_spawn": ("tab:green", ":"), "scale_out_ready": ("tab:green", "-"),
               "scale_in_sigterm": ("tab:red", "-"),
               "scale_in_exit": ("tab:red", "--")}


def _mark_events(axes, events: list[dict]) -> None:
    spawned = {e["worker"]: e["t"] for e in events if e["kind"] == "scale_out_spawn"}
    for e in events:
        if e["kind"] == "scale_out_ready" and e["worker"] in spawned:
            for ax in axes:
                ax.axvspan(spawned[e["worker"]], e["t"], color="tab:green", alpha=0.12)
    ordered = sorted(events, key=lambda e: e["t"])
    for e, after in zip(ordered, [*ordered[1:], None]):
        color, style = EVENT_STYLE.get(e["kind"], ("tab:gray", ":"))
        for ax in axes:
            ax.axvline(e["t"], color=color, ls=style, lw=1.2)
        left = after is not None and after["t"] - e["t"] < 1.0  # two at once: the first label on the left
        axes[0].annotate(e["label"], (e["t"], 1.0), xycoords=("data", "axes fraction"), xytext=(-2 if left else 2, -2),
                         textcoords="offset points", rotation=90, va="top", ha="right" if left else "left",
                         fontsize=7, color=color)


def _line(ax, series: list[dict], key: str, **kw) -> None:
    points = [(row["t"] + 1, row[key]) for row in series if row[key] is not None]  # a bucket's end
    if points:
        ax.plot(*zip(*points), **kw)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records, series, cfg = result["turns"], result["series"], result["config"]
    fig, axes = plt.subplots(5, 1, figsize=(12, 14), sharex=True, height_ratios=[3, 3, 2, 2, 1.5])
    ax = axes[0]
    points = [(r["t"], r["ttft_s"] * 1000) for r in records if r["ttft_s"] is not None]
    if points:
        ax.scatter(*zip(*points), s=4, alpha=0.35, c="tab:blue", label="turn (by send time)")
    failed = [r["t"] for r in records if r["error"]]
    if failed:
        ax.scatter(failed, [0.03] * len(failed), marker="x", c="red", label="failed turn (by send time)",
                   transform=ax.get_xaxis_transform())
    _line(ax, series, "ttft_rolling_p50_ms", c="black", label=f"p50, last {cfg['window_s']} s")
    _line(ax, series, "ttft_rolling_p99_ms", c="tab:orange", label=f"p99, last {cfg['window_s']} s")
    ax.set_ylabel("TTFT (ms)")
    ax = axes[1]
    gaps = [(t, gap * 1000) for r in records for t, gap in token_arrivals(r) if gap is not None]
    if gaps:
        ax.scatter(*zip(*gaps), s=1, alpha=0.15, c="tab:blue", label="gap (by arrival)")
    _line(ax, series, "itl_rolling_p50_ms", c="black", label=f"p50, last {cfg['window_s']} s")
    _line(ax, series, "itl_rolling_p99_ms", c="tab:orange", label=f"p99, last {cfg['window_s']} s")
    ax.set_ylabel("inter-token latency (ms)")
    for ax in axes[:2]:
        if points or gaps:
            ax.set_yscale("log")
    _plot_throughput(axes[2], series)
    _line(axes[3], [{**row, "pct": None if row["hit_rate"] is None else row["hit_rate"] * 100} for row in series],
          "pct", c="tab:purple", marker=".", label="cached / context tokens, turns finished that second")
    axes[3].set_ylim(-2, 102)
    axes[3].set_ylabel("prefix hit rate (%)")
    _plot_workers(axes[4], series)
    axes[4].set_xlabel("seconds since the load started")
    _mark_events(axes, result["events"])
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
    target = cfg["gateway_url"] or f"local cluster of {cfg['workers']} workers, {cfg['model']}"
    fig.suptitle(f"load run: {cfg['sessions']} conversations x {cfg['duration_s']:.0f} s, {target} "
                 f"({cfg['prompt_tokens']}-token prompts, {cfg['max_tokens']} tokens per turn)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_workers(ax, series: list[dict]) -> None:
    workers = sorted({w for row in series for w in row["turns_by_worker"]}, key=str)
    if workers:
        ax.stackplot([row["t"] + 1 for row in series],
                     [[row["turns_by_worker"].get(w, 0) for row in series] for w in workers],
                     labels=[str(w) for w in workers], step="pre", alpha=0.8)
    ax.set_ylabel("turns/s by worker")


def _plot_throughput(ax, series: list[dict]) -> None:
    ax.step([row["t"] + 1 for row in series], [row["tokens"] for row in series], where="pre", c="tab:blue",
            label="tokens/s")
    ax.set_ylabel("tokens/s")
    ax.set_ylim(bottom=0)
    turns = ax.twinx()
    turns.step([row["t"] + 1 for row in series], [row["turns_done"] for row in series], where="pre",
               c="tab:green", alpha=0.7, label="turns/s")
    turns.set_ylabel("turns/s", color="tab:green")
    turns.set_ylim(bottom=0)
    turns.legend(fontsize=7, loc="lower left")


# --- the run -------------------------------------------------------------------------------

class Conversations:
    """One thread per session, each running its conversation's turns back to back (a new
    conversation past max_context tokens or after a failed turn) until stop()."""

    def __init__(self, url: str, config: LoadConfig, client: httpx.Client):
        self.url, self.config, self.client = url, config, client
        self.records: list[dict] = []
        self.t0 = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(config.sessions)]

    def clock(self) -> float:
        return time.perf_counter() - self.t0

    def start(self) -> None:
        self.t0 = time.perf_counter()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 180.0) -> None:
        """No new turns; the turns in flight finish."""
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def _run(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        seq_id, length = f"load-{index}-{uuid.uuid4().hex[:10]}", 0
        while not self._stop.is_set():
            if length > self.config.max_context:
                seq_id, length = f"load-{index}-{uuid.uuid4().hex[:10]}", 0
            token_times: list[float] = []
            r = turn(self.url, token_times=token_times, client=self.client, prompt=text(self.config.prompt_tokens, rng),
                     seq_id=seq_id, max_tokens=self.config.max_tokens, temperature=0)
            rec = turn_record(r, self.t0, token_times, index, seq_id)
            self.records.append(rec)
            if rec["error"] or rec["context_tokens"] is None:
                seq_id, length = f"load-{index}-{uuid.uuid4().hex[:10]}", 0  # its history is unknown now
            else:
                length = rec["context_tokens"] + r["done"]["usage"]["completion_tokens"]


class Scaler(threading.Thread):
    """Adds a worker at scale_out_at_s and drains one at scale_in_at_s (the added one, else the
    highest-numbered), recording when each step starts and ends."""

    def __init__(self, cluster: LocalCluster, config: LoadConfig, clock, log):
        super().__init__(name="scaler", daemon=True)
        self.cluster, self.config, self.clock, self.log = cluster, config, clock, log
        self.events: list[dict] = []
        self.stopped = threading.Event()
        self._added: str | None = None

    def _event(self, kind: str, worker: str, label: str, t: float | None = None) -> None:
        t = round(self.clock() if t is None else t, 3)
        self.events.append({"t": t, "kind": kind, "worker": worker, "label": f"{worker} {label}"})
        self.log(f"{t:6.1f} s  {worker} {label}")

    def _wait_until(self, t: float) -> bool:
        return not self.stopped.wait(max(0.0, t - self.clock()))

    def run(self) -> None:
        try:
            if self.config.scale_out_at_s is not None and self._wait_until(self.config.scale_out_at_s):
                spawned_s = self.clock()
                self.log(f"{spawned_s:6.1f} s  adding a worker")
                self._added = self.cluster.add_worker()
                self._event("scale_out_spawn", self._added, "spawned", spawned_s)
                self._event("scale_out_ready", self._added, "on the ring")
                if self.config.scale_in_at_s is not None and self.clock() > self.config.scale_in_at_s:
                    self.log(f"{self._added} joined after --scale-in-at: it is drained at once")
            if self.config.scale_in_at_s is not None and self._wait_until(self.config.scale_in_at_s):
                name = self._added or self.cluster.worker_names[-1]
                self._event("scale_in_sigterm", name, "SIGTERM (drains)")
                code = self.cluster.remove_worker(name, timeout_s=120)
                self._event("scale_in_exit", name, f"exited ({code})")
        except (RuntimeError, TimeoutError) as exc:
            self.log(f"scaling failed: {exc}")


def _progress(load: Conversations, config: LoadConfig, cluster: LocalCluster | None, bar) -> None:
    """Until the duration is over: the bar at the elapsed time, with figures so far."""
    while (now := load.clock()) < config.duration_s:
        records = list(load.records)
        ttfts = [r["ttft_s"] * 1000 for r in records if r["ttft_s"] is not None]
        recent = 0
        for r in reversed(records):  # in the order they finished
            if r["end_s"] < now - config.window_s:
                break
            recent += sum(1 for t, _ in token_arrivals(r) if t >= now - config.window_s)
        postfix = {"turns": len(records), "tok/s": f"{recent / min(config.window_s, max(now, 1e-9)):.0f}",
                   "TTFT p50": f"{_ms(percentile(ttfts, 50))} ms", "errors": sum(1 for r in records if r["error"])}
        if cluster is not None:
            postfix["workers"] = len(cluster.worker_names)
        bar.set_postfix(postfix, refresh=False)
        bar.update(min(now, config.duration_s) - bar.n)
        time.sleep(0.5)
    bar.update(config.duration_s - bar.n)


def drive(url: str, config: LoadConfig, cluster: LocalCluster | None) -> dict:
    from tqdm import tqdm
    client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=config.sessions + 4))
    load = Conversations(url, config, client)
    bar = tqdm(total=config.duration_s, unit="s", dynamic_ncols=True, mininterval=0.5,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
    scaler = Scaler(cluster, config, load.clock, bar.write) if cluster is not None else None
    with client, bar:
        load.start()
        if scaler is not None:
            scaler.start()
        _progress(load, config, cluster, bar)
        load.stop()
        wall_s = load.clock()
    if scaler is not None:
        if scaler.is_alive():
            print("waiting for the scaling step in progress...", flush=True)
        scaler.stopped.set()
        scaler.join(timeout=300)
    return build_result(config, load.records, scaler.events if scaler else [], wall_s)


def run_local(config: LoadConfig, out: Path, model_cache_dir: Path) -> dict:
    from services.worker.model.presets import resolve_model_path
    resolve_model_path(config.model, model_cache_dir)  # build the preset once, before workers start
    env = {"WORKER_MODEL_NAME": config.model, "WORKER_MODEL_CACHE_DIR": str(model_cache_dir),
           "WORKER_DRAIN_TIMEOUT_S": "20"}
    cluster = LocalCluster(num_workers=config.workers, log_dir=fresh_dir(out / "load_run" / "logs"), worker_env=env)
    print(f"starting {config.workers} workers ({config.model}); logs in {cluster.log_dir}", flush=True)
    with cluster:
        rng = random.Random(config.seed)
        CLIENT.headers.update(cluster.internal_headers)  # the warm-up asks each worker directly
        for url in cluster.worker_urls:  # each worker's first forward, outside the measurement
            turn(url, prompt=text(config.prompt_tokens, rng), seq_id=f"warm-{uuid.uuid4().hex[:8]}", max_tokens=2,
                 temperature=0)
        return drive(cluster.gateway_url, config, cluster)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="load_run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8, help="concurrent conversations (default 8)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--scale-out-at", type=float, help="seconds into the run: add a worker (local cluster)")
    parser.add_argument("--scale-in-at", type=float, help="seconds into the run: drain a worker (the added one)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the local cluster at the start")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"the local cluster's preset (default {DEFAULT_MODEL})")
    parser.add_argument("--gateway-url", help="drive this gateway instead of starting a local cluster")
    parser.add_argument("--prompt-tokens", type=int, default=12, help="new prompt tokens per turn (default 12)")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per turn (default 16)")
    parser.add_argument("--max-context", type=int, default=640,
                        help="a new conversation once the context passes this (default 640)")
    parser.add_argument("--window", type=int, default=5, help="seconds of the rolling percentiles (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    parser.add_argument("--model-cache-dir", type=Path, default=Path.home() / ".cache" / "kvcache" / "models")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="draw the PNG (and print the table) again from a load_run.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())  # series and summary again, from the turns
        result = build_result(LoadConfig(**saved["config"]), saved["turns"], saved["events"],
                              saved["summary"]["wall_s"])
        plot(result, args.replot.with_suffix(".png"))
        print(table(result) + f"\n\nwritten: {args.replot.with_suffix('.png')}")
        return
    try:
        config = LoadConfig(sessions=args.sessions, duration_s=args.duration, prompt_tokens=args.prompt_tokens,
                            max_tokens=args.max_tokens, max_context=args.max_context, window_s=args.window,
                            scale_out_at_s=args.scale_out_at, scale_in_at_s=args.scale_in_at, workers=args.workers,
                            model=None if args.gateway_url else args.model, gateway_url=args.gateway_url,
                            seed=args.seed)
    except ValueError as exc:
        sys.exit(f"load_run.py: {exc}")
    args.out.mkdir(parents=True, exist_ok=True)
    if config.gateway_url:
        result = drive(config.gateway_url.rstrip("/"), config, None)
    else:
        result = run_local(config, args.out, args.model_cache_dir)
    (args.out / "load_run.json").write_text(json.dumps(result))
    plot(result, args.out / "load_run.png")
    print("\n" + table(result) + f"\n\nwritten: {args.out}/load_run.json, {args.out}/load_run.png")


if __name__ == "__main__":
    main()
