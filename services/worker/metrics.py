"""All worker metrics, prefix kvcache_worker_. Engine counters are exported at scrape time."""

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "kvcache_worker_"
GAUGES = ("sequences", "stateless_sequences", "prefix_indexed_sequences", "cached_sequences",
          "cached_tokens", "kv_bytes_used", "kv_bytes_peak", "kv_bytes_limit", "running", "waiting")
# Exported with the `_total` suffix, e.g. kvcache_worker_prefix_cache_hits_total.
COUNTERS = ("requests", "hits", "misses", "new_sequences", "stateless_requests", "evictions", "prefill_tokens",
            "handoff_tokens", "reused_tokens", "generated_tokens", "steps", "aborted", "rejected",
            "prefix_cache_queries", "prefix_cache_hits")


class WorkerMetrics:
    def __init__(self, stats_source):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(P + "generate_requests", "POST /generate by outcome",
                                     ["outcome"], registry=self.registry)
        self.completion_requests = Counter(P + "completion_requests", "POST /completions by outcome",
                                           ["outcome"], registry=self.registry)
        self.ttft = Histogram(P + "ttft_seconds", "time to first token", registry=self.registry,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.registry.register(_EngineCollector(stats_source))


class _EngineCollector:
    def __init__(self, stats_source):
        self.stats_source = stats_source  # callable -> dict, or None before the model is loaded

    def collect(self):
        stats = self.stats_source() or {}
        for name in GAUGES:
            if name in stats:
                yield GaugeMetricFamily(P + name, name.replace("_", " "), value=stats[name])
        for name in COUNTERS:
            if name in stats:
                yield CounterMetricFamily(P + name, name.replace("_", " "), value=stats[name])
