"""All gateway Prometheus metrics, on a per-app registry, with bounded labels."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.loop_stall import BUSY_HELP as LOOP_BUSY_STALL_HELP
from services.common.loop_stall import HELP as LOOP_STALL_HELP
from services.common.metrics import PREFIX

_NAME = f"{PREFIX}_gateway"
_TTFB_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STREAM_OUTCOMES = ("done", "error", "upstream_error", "client_disconnect")
ROUTING_DECISIONS = ("owner", "spilled", "rerouted", "migrated", "round_robin")
_ENDPOINTS = {"/generate": "generate", "/stats": "stats", "/health": "health", "/metrics": "metrics",
              "/v1/chat/completions": "chat_completions", "/v1/completions": "completions", "/v1/models": "models"}


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.loop_stall = Gauge(f"{_NAME}_event_loop_stall_max_seconds", LOOP_STALL_HELP, registry=self.registry)
        self.loop_busy_stall = Gauge(f"{_NAME}_event_loop_busy_stall_max_seconds", LOOP_BUSY_STALL_HELP,
                                     registry=self.registry)
        self.requests = Counter(
            f"{_NAME}_requests_total", "HTTP requests by endpoint and status class.",
            ["endpoint", "code_class"], registry=self.registry)
        self._requests_by: dict[tuple[str, int], Counter] = {}  # (endpoint, status // 100) -> child
        self.streams = Counter(
            f"{_NAME}_streams_total", "Relayed token streams by how they ended.",
            ["outcome"], registry=self.registry)
        # Children by label value, looked up once: labels() validates and locks on every call
        # (1-2 us, several times a request)
        self.stream_outcomes = {outcome: self.streams.labels(outcome) for outcome in STREAM_OUTCOMES}
        self.upstream_retries = Counter(
            f"{_NAME}_upstream_retries_total",
            "Requests re-routed and retried after a worker could not be reached.",
            registry=self.registry)
        self.migrations = Counter(
            f"{_NAME}_migrations_total",
            "Streams continued on a new owner after their worker's stream broke, by outcome (ok, failed).",
            ["outcome"], registry=self.registry)
        self.migration_outcomes = {outcome: self.migrations.labels(outcome) for outcome in ("ok", "failed")}
        self.routing_decisions = Counter(
            f"{_NAME}_routing_decisions_total",
            "Where requests were sent: owner (the key's ring owner), spilled (past a loaded owner, "
            "bounded-load hashing), rerouted (past an unreachable or draining owner), migrated (a broken "
            "stream continued elsewhere), round_robin (GATEWAY_ROUTING=round_robin).",
            ["decision"], registry=self.registry)
        self.decisions = {decision: self.routing_decisions.labels(decision) for decision in ROUTING_DECISIONS}
        self.active_streams = Gauge(
            f"{_NAME}_active_streams", "Token streams being relayed now.", registry=self.registry)
        self.ttfb_s = Histogram(
            f"{_NAME}_time_to_first_byte_seconds",
            "From request arrival to the worker's first event (streaming) or whole body (non-streaming).",
            buckets=_TTFB_BUCKETS_S, registry=self.registry)

    def count_request(self, path: str, status_code: int) -> None:
        key = (endpoint_label(path), status_code // 100)  # bounded: endpoints x status classes
        child = self._requests_by.get(key)
        if child is None:
            child = self._requests_by[key] = self.requests.labels(key[0], f"{key[1]}xx")
        child.inc()


def endpoint_label(path: str) -> str:
    if path.startswith("/sequences/"):
        return "sequences"
    if path.startswith("/v1/models/"):
        return "models"
    return _ENDPOINTS.get(path, "other")


class RequestMetricsMiddleware:
    """Counts every HTTP request by endpoint and status class (pure ASGI, so streams are not buffered)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_code = 500

        async def send_recording_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_recording_status)
        finally:
            self.metrics.count_request(scope["path"], status_code)
