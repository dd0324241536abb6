"""Worker registry with heartbeat TTLs, kept in sync with the hash ring. Pure: no I/O, no framework.

A worker is `active` (on the ring) or `draining` (registered, off the ring: it takes no new keys
but still serves KV pulls). Recent rings are remembered for `handoff_window_s`, so `route` can
name a key's earlier owners, from which its new owner pulls the sequence's KV.

Not thread-safe: the coordinator calls it only from its event loop (routes and the sweep task).
"""

import logging
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

from services.coordinator.ring import EmptyRingError, HashRing

log = logging.getLogger(__name__)

Change = Literal["join", "leave", "expire", "update", "drain"]
WorkerState = Literal["active", "draining"]
OnChange = Callable[[Change, str, int], None]
OnVersion = Callable[[int], None]

MAX_RINGS_KEPT = 64
# WorkerGenerateRequest.handoff_sources takes at most 16; the newest owners are the likeliest sources.
MAX_PREVIOUS = 16


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
    state: WorkerState = "active"
    load: int = 0          # requests in progress, as last reported
    load_reports: int = 0
    served_model_names: tuple[str, ...] = ()  # what clients may call its model (default: model_name)
    max_model_len: int | None = None          # its model's window, in tokens


class Peer(NamedTuple):
    worker_id: str
    address: str


class Route(NamedTuple):
    worker_id: str
    address: str
    epoch: int
    previous: tuple[Peer, ...] = ()  # earlier owners still registered, newest first


class RetiredRing(NamedTuple):
    retired_at: float  # when it stopped being the current ring
    ring: HashRing


def previous_owners(key: str, retired_rings: Iterable[HashRing], addresses: Mapping[str, str],
                    skip: Collection[str]) -> tuple[Peer, ...]:
    """The key's owners on the retired rings (newest first) that are still registered (have an
    address), each once, not in `skip`, at most MAX_PREVIOUS: where its KV may still be."""
    seen, previous = set(skip), []
    for ring in retired_rings:
        worker_id = ring.owner(key)
        if worker_id in seen or worker_id not in addresses:
            continue
        seen.add(worker_id)
        previous.append(Peer(worker_id, addresses[worker_id]))
        if len(previous) == MAX_PREVIOUS:
            break
    return tuple(previous)


class Membership:
    """`epoch` counts membership changes that alter routing or handoff sources: joins, drains,
    leaves, expiries, and address updates. Heartbeats never bump it. `version` counts those and
    changes of a reported load: what a router syncing the ring waits on (`on_version`)."""

    def __init__(self, *, ttl_s: float, vnodes: int = 100, handoff_window_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, on_change: OnChange | None = None,
                 on_version: OnVersion | None = None):
        self.ttl_s = ttl_s
        self.handoff_window_s = handoff_window_s
        self.ring = HashRing(vnodes)
        self.epoch = 0
        self.version = 0
        self._clock = clock
        self._on_change = on_change
        self._on_version = on_version
        self._workers: dict[str, WorkerInfo] = {}
        self._history: deque[RetiredRing] = deque(maxlen=MAX_RINGS_KEPT)  # oldest first

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    @property
    def num_active(self) -> int:
        return sum(info.state == "active" for info in self._workers.values())

    @property
    def num_draining(self) -> int:
        return len(self._workers) - self.num_active

    @property
    def num_rings_kept(self) -> int:
        return len(self._history)

    def now(self) -> float:
        return self._clock()

    def workers(self) -> list[WorkerInfo]:
        return [self._workers[w] for w in sorted(self._workers)]

    def get(self, worker_id: str) -> WorkerInfo:
        info = self._workers.get(worker_id)
        if info is None:
            raise UnknownWorker(f"worker {worker_id!r} is not registered")
        return info

    def register(self, worker_id: str, address: str, model_name: str | None = None, *,
                 draining: bool = False, served_model_names: Collection[str] = (),
                 max_model_len: int | None = None) -> WorkerInfo:
        """Idempotent. A known worker is refreshed, moved if its address changed (or its model's
        names), and switched to the state `draining` asks for: a restarted pod with the same id
        rejoins the ring."""
        now = self._clock()
        state: WorkerState = "draining" if draining else "active"
        names = tuple(served_model_names)
        info = self._workers.get(worker_id)
        if info is None:
            info = WorkerInfo(worker_id, address, model_name, registered_at=now, last_heartbeat=now,
                              state=state, served_model_names=names, max_model_len=max_model_len)
            self._workers[worker_id] = info
            if not draining:
                self._update_ring(worker_id, on_ring=True)
            self._changed("drain" if draining else "join", info)
            return info
        info.last_heartbeat = now
        moved = (info.address, info.model_name, info.served_model_names, info.max_model_len) != \
            (address, model_name, names, max_model_len)
        info.address, info.model_name = address, model_name
        info.served_model_names, info.max_model_len = names, max_model_len
        if info.state != state:
            self._set_state(info, state)
        elif moved:
            self._changed("update", info)
        return info

    def drain(self, worker_id: str) -> WorkerInfo:
        """Takes an active worker off the ring at once; it stays registered (heartbeats and the
        TTL still apply) until it deregisters or expires. Idempotent."""
        info = self.get(worker_id)
        if info.state == "active":
            self._set_state(info, "draining")
        return info

    def heartbeat(self, worker_id: str, load: int | None = None) -> WorkerInfo:
        """`load`: the worker's requests in progress; a report that changes it bumps `version`."""
        info = self.get(worker_id)
        info.last_heartbeat = self._clock()
        if load is not None:
            changed = load != info.load
            info.load = load
            info.load_reports += 1
            if changed:
                self._bump_version()
        return info

    def deregister(self, worker_id: str) -> bool:
        """Returns False for an unknown worker, so a retried shutdown call is harmless."""
        if worker_id not in self._workers:
            return False
        self._remove(worker_id, "leave")
        return True

    def expire(self) -> list[str]:
        """Drops workers silent for longer than ttl_s, and rings older than the handoff window;
        returns the dropped workers' ids."""
        now = self._clock()
        self._forget_rings(now)
        expired = sorted(w for w, info in self._workers.items() if info.last_heartbeat < now - self.ttl_s)
        for worker_id in expired:
            self._remove(worker_id, "expire")
        return expired

    def route(self, seq_id: str, exclude: Collection[str] = ()) -> Route:
        """The key's owner on the current ring, skipping `exclude` (workers the caller could not
        reach), and its earlier owners within the handoff window; excluded ones are never listed."""
        excluded = frozenset(exclude)
        try:
            worker_id = self.ring.owner(seq_id, excluded)
        except EmptyRingError:
            excluded_all = bool(excluded) and len(self.ring) > 0
            raise NoWorkers("every active worker is excluded" if excluded_all
                            else "no worker is active") from None
        self._forget_rings(self._clock())
        addresses = {w: info.address for w, info in self._workers.items()}
        previous = previous_owners(seq_id, self.retired_rings(), addresses, skip=excluded | {worker_id})
        return Route(worker_id, self._workers[worker_id].address, self.epoch, previous)

    def retired_rings(self) -> list[HashRing]:
        """The rings of the handoff window, newest first."""
        return [retired.ring for retired in reversed(self._history)]

    def snapshot(self) -> dict:
        """What a router needs to route by itself (the fields of schemas.RingSnapshot)."""
        now = self._clock()
        self._forget_rings(now)
        workers = [{"worker_id": w.worker_id, "address": w.address, "model_name": w.model_name,
                    "state": w.state, "age_s": round(now - w.registered_at, 3),
                    "last_heartbeat_age_s": round(now - w.last_heartbeat, 3), "load": w.load,
                    "load_reports": w.load_reports, "served_model_names": list(w.served_model_names),
                    "max_model_len": w.max_model_len} for w in self.workers()]
        return {"version": self.version, "epoch": self.epoch, "vnodes": self.ring.vnodes,
                "workers": workers, "retired": [ring.workers for ring in self.retired_rings()]}

    def _set_state(self, info: WorkerInfo, state: WorkerState) -> None:
        info.state = state
        if state == "active":
            self._update_ring(info.worker_id, on_ring=True)
            self._changed("join", info)
        else:
            self._update_ring(info.worker_id, on_ring=False)
            self._changed("drain", info)

    def _remove(self, worker_id: str, change: Change) -> None:
        info = self._workers.pop(worker_id)
        self._update_ring(worker_id, on_ring=False)
        self._changed(change, info)

    def _update_ring(self, worker_id: str, *, on_ring: bool) -> None:
        """Adds or removes the worker, remembering the ring as it was if that changed it."""
        before = self.ring.copy()
        changed = self.ring.add(worker_id) if on_ring else self.ring.remove(worker_id)
        if changed and len(before):  # an empty ring owned nothing: no handoff source
            now = self._clock()
            self._history.append(RetiredRing(now, before))
            self._forget_rings(now)

    def _forget_rings(self, now: float) -> None:
        while self._history and self._history[0].retired_at < now - self.handoff_window_s:
            self._history.popleft()

    def _changed(self, change: Change, info: WorkerInfo) -> None:
        self.epoch += 1
        log.info("worker %s %s (%s, %s): epoch %d, %d workers, %d active", info.worker_id, change,
                 info.address, info.state, self.epoch, len(self._workers), self.num_active)
        if self._on_change is not None:
            self._on_change(change, info.worker_id, self.epoch)
        self._bump_version()

    def _bump_version(self) -> None:
        self.version += 1
        if self._on_version is not None:
            self._on_version(self.version)
