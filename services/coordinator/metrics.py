"""All coordinator Prometheus metrics, on a registry owned by one app instance."""

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.common.loop_stall import BUSY_HELP as LOOP_BUSY_STALL_HELP
from services.common.loop_stall import HELP as LOOP_STALL_HELP
from services.common.metrics import PREFIX

NAMESPACE = f"{PREFIX}_coordinator"
ROUTE_OUTCOMES = ("ok", "invalid", "unavailable")
HEARTBEAT_OUTCOMES = ("ok", "unknown")
CHANGES = ("join", "leave", "expire", "update", "drain")
WATCH_RESTART_REASONS = ("expired", "error", "failed")  # kubernetes_watch.RESTART_REASONS


class CoordinatorMetrics:
    """Labels are closed sets (outcome, change kind); never worker or sequence ids."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.route_requests = Counter(
            "route_requests", "Route lookups by outcome (ok, invalid, unavailable).",
            ["outcome"], namespace=NAMESPACE, registry=self.registry)
        self.heartbeats = Counter(
            "heartbeats", "Heartbeats by outcome (ok, unknown).",
            ["outcome"], namespace=NAMESPACE, registry=self.registry)
        self.ring_changes = Counter(
            "ring_changes", "Membership changes by kind (join, leave, expire, update, drain).",
            ["change"], namespace=NAMESPACE, registry=self.registry)
        self.registered_workers = Gauge(
            "registered_workers", "Workers currently registered and alive (draining included).",
            namespace=NAMESPACE, registry=self.registry)
        self.draining_workers = Gauge(
            "draining_workers", "Registered workers that are draining (off the ring).",
            namespace=NAMESPACE, registry=self.registry)
        self.epoch = Gauge(
            "epoch", "Current membership epoch.", namespace=NAMESPACE, registry=self.registry)
        self.loop_stall = Gauge("event_loop_stall_max_seconds", LOOP_STALL_HELP, namespace=NAMESPACE,
                                registry=self.registry)
        self.loop_busy_stall = Gauge("event_loop_busy_stall_max_seconds", LOOP_BUSY_STALL_HELP,
                                     namespace=NAMESPACE, registry=self.registry)
        self.kubernetes_watch_restarts = Counter(
            "kubernetes_watch_restarts", "EndpointSlice watch restarts (COORDINATOR_MEMBERSHIP=kubernetes) by "
            "reason: expired (410 Gone: listed again), error (an ERROR event), failed (the API server "
            "unreachable or refusing: retried after a pause).",
            ["reason"], namespace=NAMESPACE, registry=self.registry)
        # Touch every label value so each series is exported at 0 before its first event.
        for outcome in ROUTE_OUTCOMES:
            self.route_requests.labels(outcome=outcome)
        for outcome in HEARTBEAT_OUTCOMES:
            self.heartbeats.labels(outcome=outcome)
        for change in CHANGES:
            self.ring_changes.labels(change=change)
        for reason in WATCH_RESTART_REASONS:
            self.kubernetes_watch_restarts.labels(reason=reason)

    def record_change(self, change: str, num_workers: int, num_draining: int, epoch: int) -> None:
        self.ring_changes.labels(change=change).inc()
        self.registered_workers.set(num_workers)
        self.draining_workers.set(num_draining)
        self.epoch.set(epoch)

    def record_watch_restart(self, reason: str) -> None:
        self.kubernetes_watch_restarts.labels(reason=reason).inc()
