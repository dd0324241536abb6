"""All worker metrics, prefix kvcache_worker_, with vLLM's names and meanings where vLLM has one.

Request timings are observed on the engine thread (WorkerMetrics is the engine's observer; the
prometheus_client metrics are thread-safe); the engine's gauges and counters are read from
Engine.stats() at scrape time. Labels are closed sets, every series exported from the start.
"""

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.common.metrics import PREFIX
from services.worker.engine.engine import EngineObserver
from services.worker.engine.sequence import RequestTimings
from services.worker.kv.lower import TIERS, TierObserver

P = f"{PREFIX}_worker_"
# vLLM's buckets (vllm/v1/metrics/loggers.py), cut at the long end, with finer ones below
# 10 ms: a small model on CPU answers in milliseconds.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                  10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
                     15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
IO_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# How starting a request can end: accepted, or the error that refused it.
START_OUTCOMES = ("accepted", "context_too_long", "overloaded", "unavailable", "internal_error")
STORE_OPS = ("load", "begin_turn", "end_turn", "renew", "delete")

# Engine.stats() key -> (exported name, help). Counters are exported with the `_total` suffix.
GAUGES = {
    "sequences": ("sequences", "Entries in this worker's KV store (sessions and stateless)."),
    "stateless_sequences": ("stateless_sequences", "Stateless (/completions) entries: pure prefix cache."),
    "prefix_indexed_sequences": ("prefix_indexed_sequences", "Idle entries a new request's prefix can match."),
    "cached_sequences": ("cached_sequences", "Entries holding KV."),
    "cached_tokens": ("cached_tokens", "Positions whose KV is held."),
    "kv_bytes_used": ("kv_bytes_used", "Bytes of KV allocated (idle sequences' KV included until evicted)."),
    "kv_bytes_peak": ("kv_bytes_peak", "Highest kv_bytes_used since start."),
    "kv_bytes_limit": ("kv_bytes_limit", "The KV byte budget."),
    "running": ("num_requests_running", "Requests in the running batch (prefilling or decoding)."),
    "waiting": ("num_requests_waiting", "Requests submitted to the engine and not admitted yet."),
}
COUNTERS = {
    "requests": ("requests", "Requests admitted to the engine (/generate and /completions)."),
    "hits": ("hits", "Session turns with earlier context whose KV was (partly) here."),
    "misses": ("misses", "Session turns with earlier context and none of its KV here (recomputed)."),
    "new_sequences": ("new_sequences", "First turns of sessions new to this worker."),
    "stateless_requests": ("stateless_requests", "Stateless (/completions) requests admitted."),
    "evictions": ("evictions", "Entries whose KV was evicted (LRU) to make room."),
    "prompt_tokens": ("prompt_tokens", "Context tokens of each admitted request (earlier turns included)."),
    "prefill_tokens": ("prefill_tokens", "Context tokens computed (not reused) at admission."),
    "reused_tokens": ("reused_tokens", "Context tokens whose KV was reused (cache or handoff)."),
    "handoff_tokens": ("handoff_tokens", "Context tokens whose KV was pulled from another worker."),
    "tier_tokens": ("tier_tokens", "Context tokens whose KV was loaded from the host, disk or shared tiers."),
    "generated_tokens": ("generation_tokens", "Tokens generated."),
    "steps": ("steps", "Engine steps (one packed forward pass each)."),
    "aborted": ("aborted", "Requests aborted while waiting or running (client gone)."),
    "rejected": ("rejected", "Requests refused at admission (too long, larger than the KV budget)."),
    "prefix_cache_queries": ("prefix_cache_queries", "Context tokens looked up in the prefix cache (reuse on)."),
    "prefix_cache_hits": ("prefix_cache_hits", "Context tokens found in the prefix cache."),
}


TIER_COUNTERS = {
    "hits": ("kv_tier_hits", "KV chunks found in the tier."),
    "misses": ("kv_tier_misses", "KV chunks looked up in the tier and not there."),
    "bytes_loaded": ("kv_tier_loaded_bytes", "Bytes of KV chunks read from the tier."),
    "bytes_stored": ("kv_tier_stored_bytes", "Bytes of KV chunks written to the tier."),
    "rejected": ("kv_tier_rejected", "Stored chunks ignored: corrupt, or another model's fingerprint."),
    "errors": ("kv_tier_errors", "Tier reads or writes that failed (I/O, network)."),
}


class WorkerMetrics(EngineObserver, TierObserver):
    def __init__(self, stats_source):
        self.registry = CollectorRegistry()
        self.http_requests = self._outcomes("generate_requests", "POST /generate by outcome of its start.")
        self.completion_requests = self._outcomes("completion_requests",
                                                  "POST /completions by outcome of its start.")
        self.ttft = self._histogram("time_to_first_token_seconds",
                                    "From arrival at the engine to the first token.", TTFT_BUCKETS_S)
        self.itl = self._histogram("inter_token_latency_seconds",
                                   "Between consecutive tokens of a request.", ITL_BUCKETS_S)
        self.e2e = self._histogram("e2e_request_latency_seconds",
                                   "From arrival at the engine to the last token.", REQUEST_BUCKETS_S)
        self.queue_time = self._histogram("request_queue_time_seconds",
                                          "Waiting, from arrival to admission (the first scheduled step).",
                                          REQUEST_BUCKETS_S)
        self.prefill_time = self._histogram("request_prefill_time_seconds",
                                            "From admission to the first token.", REQUEST_BUCKETS_S)
        self.decode_time = self._histogram("request_decode_time_seconds",
                                           "From the first token to the last.", REQUEST_BUCKETS_S)
        self.handoff_duration = self._histogram(
            "handoff_duration_seconds", "A successful KV pull from an earlier owner, request to import.",
            IO_BUCKETS_S)
        self.session_store_latency = Histogram(
            P + "session_store_latency_seconds", "Session-store calls by op (load, begin_turn, end_turn, "
            "renew, delete), failures included.", ["op"], buckets=IO_BUCKETS_S, registry=self.registry)
        for op in STORE_OPS:
            self.session_store_latency.labels(op)
        self.tier_load = Histogram(P + "kv_tier_load_seconds", "Reading one KV chunk from a tier (decode "
                                   "included).", ["tier"], buckets=IO_BUCKETS_S, registry=self.registry)
        self.tier_store = Histogram(P + "kv_tier_store_seconds", "Writing one KV chunk to a tier.", ["tier"],
                                    buckets=IO_BUCKETS_S, registry=self.registry)
        for tier in TIERS:
            self.tier_load.labels(tier)
            self.tier_store.labels(tier)
        self.registry.register(_EngineCollector(stats_source))

    def _outcomes(self, name: str, documentation: str) -> Counter:
        counter = Counter(P + name, documentation, ["outcome"], registry=self.registry)
        for outcome in START_OUTCOMES:
            counter.labels(outcome)
        return counter

    def _histogram(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        return Histogram(P + name, documentation, buckets=buckets, registry=self.registry)

    def observe_store_call(self, op: str, seconds: float) -> None:
        self.session_store_latency.labels(op).observe(seconds)

    def on_load(self, tier: str, seconds: float, nbytes: int) -> None:
        self.tier_load.labels(tier).observe(seconds)

    def on_store(self, tier: str, seconds: float, nbytes: int) -> None:
        self.tier_store.labels(tier).observe(seconds)

    def on_token_gap(self, gap_s: float) -> None:
        self.itl.observe(gap_s)

    def on_finished(self, timings: RequestTimings) -> None:
        self.ttft.observe(timings.ttft_s)
        self.e2e.observe(timings.e2e_s)
        self.queue_time.observe(timings.queue_s)
        self.prefill_time.observe(timings.prefill_s)
        self.decode_time.observe(timings.decode_s)


class _EngineCollector:
    def __init__(self, stats_source):
        self.stats_source = stats_source  # callable -> dict, or None before the model is loaded

    def collect(self):
        stats = self.stats_source() or {}
        for key, (name, documentation) in GAUGES.items():
            if key in stats:
                yield GaugeMetricFamily(P + name, documentation, value=stats[key])
        if stats.get("kv_bytes_limit"):
            yield GaugeMetricFamily(P + "kv_cache_usage_perc", "Fraction (0..1) of the KV byte budget "
                                    "allocated: kv_bytes_used / kv_bytes_limit.",
                                    value=stats["kv_bytes_used"] / stats["kv_bytes_limit"])
        for key, (name, documentation) in COUNTERS.items():
            if key in stats:
                yield CounterMetricFamily(P + name, documentation, value=stats[key])
        if "kv_tiers" in stats:
            yield from _tier_metrics(stats["kv_tiers"])


def _tier_metrics(tiers: dict):
    """Per tier (label `tier`: host, disk, shared), from the LowerTiers stats."""
    per_tier = tiers["tiers"]
    for key, (name, documentation) in TIER_COUNTERS.items():
        family = CounterMetricFamily(P + name, documentation, labels=["tier"])
        for tier, counts in per_tier.items():
            family.add_metric([tier], counts[key])
        yield family
    used = GaugeMetricFamily(P + "kv_tier_bytes", "Bytes held by the tier (host, disk).", labels=["tier"])
    for tier in ("host", "disk"):
        used.add_metric([tier], per_tier[tier].get("bytes", 0))
    yield used
    yield GaugeMetricFamily(P + "kv_tier_write_queue_depth", "Tier writes waiting for the writer thread.",
                            value=tiers["write_queue_depth"])
    yield CounterMetricFamily(P + "kv_tier_write_dropped", "Tier writes dropped: the write queue was full.",
                              value=tiers["write_jobs_dropped"])
