"""Worker registry with heartbeat TTLs, kept in sync with the hash ring. Pure: no I/O, no framework.

Not thread-safe: the coordinator calls it only from its event loop (routes and the sweep task).
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

from services.coordinator.ring import EmptyRingError, HashRing

log = logging.getLogger(__name__)

Change = Literal["join", "leave", "expire", "update"]
OnChange = Callable[[Change, str, int], None]


class UnknownWorker(LookupError):
    """The worker is not registered (never was, deregistered, or expired): it must re-register."""


class NoWorkers(LookupError):
    """No worker is alive to route to."""


@dataclass
class WorkerInfo:
    worker_id: str
    address: str
    model_name: str | None
    registered_at: float
    last_heartbeat: float


class Route(NamedTuple):
    worker_id: str
    address: str
    epoch: int


class Membership:
    """`epoch` counts routing-table changes: joins, leaves, expiries, and address updates
    (a re-register at a new address changes where `route` sends keys). Heartbeats never bump it."""

    def __init__(self, *, ttl_s: float, vnodes: int = 100,
                 clock: Callable[[], float] = time.monotonic, on_change: OnChange | None = None):
        self.ttl_s = ttl_s
        self.ring = HashRing(vnodes)
        self.epoch = 0
        self._clock = clock
        self._on_change = on_change
        self._workers: dict[str, WorkerInfo] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    def now(self) -> float:
        return self._clock()

    def workers(self) -> list[WorkerInfo]:
        return [self._workers[w] for w in sorted(self._workers)]

    def get(self, worker_id: str) -> WorkerInfo:
        info = self._workers.get(worker_id)
        if info is None:
            raise UnknownWorker(f"worker {worker_id!r} is not registered")
        return info

    def register(self, worker_id: str, address: str, model_name: str | None = None) -> WorkerInfo:
        """Idempotent; a known worker is refreshed, and moved if its address changed."""
        now = self._clock()
        info = self._workers.get(worker_id)
        if info is None:
            info = WorkerInfo(worker_id, address, model_name, registered_at=now, last_heartbeat=now)
            self._workers[worker_id] = info
            self.ring.add(worker_id)
            self._changed("join", info)
            return info
        info.last_heartbeat = now
        info.model_name = model_name
        if info.address != address:
            info.address = address
            self._changed("update", info)
        return info

    def heartbeat(self, worker_id: str) -> WorkerInfo:
        info = self.get(worker_id)
        info.last_heartbeat = self._clock()
        return info

    def deregister(self, worker_id: str) -> bool:
        """Returns False for an unknown worker, so a retried shutdown call is harmless."""
        if worker_id not in self._workers:
            return False
        self._remove(worker_id, "leave")
        return True

    def expire(self) -> list[str]:
        """Drops workers silent for longer than ttl_s; returns their ids."""
        deadline = self._clock() - self.ttl_s
        expired = [w for w, info in self._workers.items() if info.last_heartbeat < deadline]
        for worker_id in sorted(expired):
            self._remove(worker_id, "expire")
        return sorted(expired)

    def route(self, seq_id: str) -> Route:
        try:
            worker_id = self.ring.owner(seq_id)
        except EmptyRingError:
            raise NoWorkers("no worker is registered") from None
        return Route(worker_id, self._workers[worker_id].address, self.epoch)

    def _remove(self, worker_id: str, change: Change) -> None:
        info = self._workers.pop(worker_id)
        self.ring.remove(worker_id)
        self._changed(change, info)

    def _changed(self, change: Change, info: WorkerInfo) -> None:
        self.epoch += 1
        log.info("worker %s %s (%s): epoch %d, %d workers", info.worker_id, change, info.address,
                 self.epoch, len(self._workers))
        if self._on_change is not None:
            self._on_change(change, info.worker_id, self.epoch)
