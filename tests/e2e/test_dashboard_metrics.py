"""The Grafana dashboard (k8s/base/dashboards/kvcache.json) queries only metrics that the services'
real /metrics output has, and covers what an operator needs to see."""

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import assert_well_formed, generate

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "base" / "dashboards" / "kvcache.json"
METRIC_NAME = re.compile(r"\bkvcache_[a-z0-9_]+")
# Sample names (a histogram's _bucket, a counter's _total) the panels must query, at least.
REQUIRED = {
    "kvcache_gateway_requests_total", "kvcache_gateway_routing_decisions_total",
    "kvcache_gateway_migrations_total",
    *(f"kvcache_worker_{h}_seconds_bucket" for h in (
        "time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time",
        "request_prefill_time", "request_decode_time", "handoff_duration", "session_store_latency")),
    "kvcache_worker_num_requests_running", "kvcache_worker_num_requests_waiting",
    "kvcache_worker_kv_cache_usage_perc", "kvcache_worker_prompt_tokens_total",
    "kvcache_worker_generation_tokens_total", "kvcache_worker_prefix_cache_queries_total",
    "kvcache_worker_prefix_cache_hits_total", "kvcache_worker_handoff_tokens_total",
    "kvcache_coordinator_registered_workers", "kvcache_coordinator_epoch",
}


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Top-level panels and those inside collapsed rows."""
    return [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression: the panels' targets and the query variables."""
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in METRIC_NAME.findall(expr)}


def samples(url: str) -> dict[str, float]:
    """Sample name -> the sum of its series' values."""
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200, url
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def test_dashboard_covers_every_panel_an_operator_needs():
    dashboard = load_dashboard()
    exprs = queries(dashboard)
    names = metric_names(exprs)
    assert REQUIRED <= names, sorted(REQUIRED - names)
    assert len(names) >= 30
    for expr in exprs:
        assert all(expr.count(a) == expr.count(b) for a, b in ("()", "[]", "{}")), expr
        for quantile in re.findall(r"histogram_quantile\([^,]+, (.*)", expr):
            assert re.search(r"sum by \([^)]*\ble\b", quantile) and "_bucket" in quantile, expr
    panels = [p for p in all_panels(dashboard) if p["type"] != "row"]
    assert len({p["id"] for p in all_panels(dashboard)}) == len(all_panels(dashboard))
    assert all(p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"} for p in panels)
    assert dashboard["templating"]["list"][0] == {**dashboard["templating"]["list"][0],
                                                  "name": "DS_PROMETHEUS", "type": "datasource"}


@pytest.mark.e2e
def test_every_dashboard_metric_is_served(cluster):
    """After one request through the gateway, each metric name the dashboard queries is a sample
    in the gateway's, the coordinator's or a worker's /metrics."""
    gen = generate(cluster.gateway_url, prompt="Dashboards need data. ", max_tokens=4, temperature=0)
    assert_well_formed(gen)
    per_service = [samples(url) for url in (cluster.gateway_url, cluster.coordinator_url, *cluster.worker_urls)]
    served = set().union(*per_service)
    missing = metric_names(queries(load_dashboard())) - served
    assert not missing, sorted(missing)
    workers = per_service[2:]
    assert sum(w["kvcache_worker_time_to_first_token_seconds_count"] for w in workers) >= 1
    assert sum(w["kvcache_worker_inter_token_latency_seconds_count"] for w in workers) >= 3
