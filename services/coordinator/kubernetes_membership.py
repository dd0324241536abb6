"""Membership when Kubernetes decides who is on the ring (COORDINATOR_MEMBERSHIP=kubernetes).
Pure: no I/O, no framework; the EndpointSlice watcher calls sync().

The worker Service's EndpointSlices say which workers are listed, at what address, and whether
each is active or draining (endpoint_slices.py). A worker's own calls add only what Kubernetes
does not know: its model's names and window (register), its load (heartbeat) and a drain it
started (drain, or register with draining). A worker that registers but is not listed waits off
the ring; a listed worker never expires for want of heartbeats (its readiness is Kubernetes's to
judge). After a restart the first list puts every listed worker back on the ring at once; each
one's first heartbeat gets 404 and it registers again, bringing its model's names.
"""

from collections.abc import Collection, Mapping

from services.coordinator.endpoint_slices import Endpoint
from services.coordinator.membership import Membership, UnknownWorker, WorkerInfo, WorkerState


class KubernetesMembership(Membership):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.synced = False  # a first list arrived
        self._listed: dict[str, Endpoint] = {}
        self._reports: dict[str, WorkerInfo] = {}  # what each worker said of itself, listed or not
        self._drained: set[str] = set()  # asked to drain (POST /drain, or registered draining)
        self._left: set[str] = set()     # deregistered while its pod is still listed (terminating)

    def sync(self, listed: Mapping[str, Endpoint]) -> None:
        """The workers Kubernetes lists now ({pod name: Endpoint}); only those whose entry changed
        are visited. The ring takes the changes at its next read, as for registrations."""
        old, self._listed = self._listed, dict(listed)
        self.synced = True
        # A drain or a departure belongs to one pod: once it is no longer listed, a new pod under
        # its name starts afresh.
        self._left &= self._listed.keys()
        self._drained &= self._listed.keys()
        for worker_id in old.keys() | self._listed.keys():
            if old.get(worker_id) != self._listed.get(worker_id):
                self._apply(worker_id)

    def register(self, worker_id: str, address: str, model_name: str | None = None, *,
                 draining: bool = False, served_model_names: Collection[str] = (),
                 max_model_len: int | None = None) -> WorkerInfo:
        """Accepted whether or not the worker is listed; its `address` is only shown until it is
        (Kubernetes's address is the one routed to)."""
        now = self._clock()
        report = self._reports.get(worker_id)
        if report is None:
            report = self._reports[worker_id] = WorkerInfo(worker_id, address, model_name, now, now)
        report.address, report.model_name, report.last_heartbeat = address, model_name, now
        report.served_model_names, report.max_model_len = tuple(served_model_names), max_model_len
        if draining:
            self._drained.add(worker_id)
        else:  # a new process under the same pod name
            self._drained.discard(worker_id)
        self._left.discard(worker_id)
        self._apply(worker_id)
        info = self._workers.get(worker_id, report)
        info.last_heartbeat = now
        return info

    def heartbeat(self, worker_id: str, load: int | None = None) -> WorkerInfo:
        """UnknownWorker for a worker that has not registered with this process, listed or not:
        the 404 makes it register, which brings its model's names."""
        report = self._reports.get(worker_id)
        if report is None:
            raise UnknownWorker(f"worker {worker_id!r} has not registered with this coordinator")
        report.last_heartbeat = self._clock()
        if worker_id in self._workers:
            return super().heartbeat(worker_id, load)
        return report

    def drain(self, worker_id: str) -> WorkerInfo:
        if worker_id not in self._reports and worker_id not in self._workers:
            raise UnknownWorker(f"worker {worker_id!r} is neither registered nor listed")
        self._drained.add(worker_id)
        self._apply(worker_id)
        return self._workers.get(worker_id) or self._reports[worker_id]

    def deregister(self, worker_id: str) -> bool:
        """Off the ring and out of the list now, even while Kubernetes still lists its pod."""
        known = self._reports.pop(worker_id, None) is not None or worker_id in self._workers
        self._drained.discard(worker_id)
        if worker_id in self._listed:
            self._left.add(worker_id)
        self._apply(worker_id)
        return known

    def settling(self, uptime_s: float) -> bool:
        """Until the first list; then, for a TTL after start, while a listed worker has not yet
        registered (routers would lack its model's names)."""
        if not self.synced:
            return True
        return uptime_s < self.ttl_s and any(w not in self._reports for w in self._workers)

    def _silent(self, since: float) -> list[str]:
        """Listed workers never expire. A worker Kubernetes does not list is forgotten after a TTL
        of silence (a pod scaled away), so it must register again."""
        stale = [w for w, r in self._reports.items() if r.last_heartbeat < since and w not in self._workers]
        for worker_id in stale:
            del self._reports[worker_id]
            self._drained.discard(worker_id)
        return []

    def _apply(self, worker_id: str) -> None:
        """Brings the worker's record in line with its listing and its own reports."""
        endpoint = None if worker_id in self._left else self._listed.get(worker_id)
        info = self._workers.get(worker_id)
        if endpoint is None:
            if info is not None:
                self._remove(worker_id, "leave")
            return
        report = self._reports.get(worker_id)
        state: WorkerState = "draining" if endpoint.state == "draining" or worker_id in self._drained else "active"
        model_name, names, max_model_len = (report.model_name, report.served_model_names, report.max_model_len) \
            if report else (None, (), None)
        if info is None:
            now = self._clock()
            self._add(WorkerInfo(worker_id, endpoint.address, model_name, registered_at=now,
                                 last_heartbeat=report.last_heartbeat if report else now, state=state,
                                 served_model_names=names, max_model_len=max_model_len))
        else:
            self._update(info, endpoint.address, model_name, names, max_model_len, state)
