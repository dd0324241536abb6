"""Worker registry with heartbeat TTLs, kept in sync with the hash ring. Pure: no I/O, no framework.

A worker is `active` (on the ring) or `draining` (registered, off the ring: it takes no new keys
but still serves KV pulls). Ring changes are applied lazily, in one batch at the next read (a
route, a ring answer, a sweep): a storm of joins costs one merge of points, not one per join, and
a ring nobody read routed nothing, so leaving it out of the handoff window loses no KV. The change
log (ring_history) names a key's earlier owners within `handoff_window_s`.

Not thread-safe: the coordinator calls it only from its event loop (routes and the sweep task).
"""

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal, NamedTuple

from services.common.hash_ring import DEFAULT_VNODES, EmptyRingError, HashRing, Points
from services.common.ring_history import MAX_PREVIOUS, ChangeLog, Peer

log = logging.getLogger(__name__)

Change = Literal["join", "leave", "expire", "update", "drain"]
WorkerState = Literal["active", "draining"]
OnChange = Callable[[Change, str, int], None]
OnVersion = Callable[[int], None]

# Removed workers remembered for deltas; a router further behind gets the full state.
MAX_GONE_KEPT = 10_000
__all__ = ["MAX_PREVIOUS", "Peer", "Membership", "NoWorkers", "UnknownWorker", "Route", "WorkerInfo"]


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


class Route(NamedTuple):
    worker_id: str
    address: str
    epoch: int
    previous: tuple[Peer, ...] = ()  # earlier owners still registered, newest first


class Membership:
    """`epoch` counts membership changes that alter routing or handoff sources: joins, drains,
    leaves, expiries, and address updates. Heartbeats never bump it. `version` counts those and
    the handoff window's moves; `load_version` counts changes of a reported load. A router syncing
    the ring waits on either (`on_version`) and asks for what changed since (`state`)."""

    def __init__(self, *, ttl_s: float, vnodes: int = DEFAULT_VNODES, handoff_window_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, on_change: OnChange | None = None,
                 on_version: OnVersion | None = None, defer_new_points: bool = False):
        """`defer_new_points`: commit() leaves workers new to the ring pending (the coordinator's
        point builder merges their points in a thread and commits them), so no read pays a merge."""
        self.ttl_s = ttl_s
        self.defer_new_points = defer_new_points
        self.handoff_window_s = handoff_window_s
        self.epoch = 0
        self.version = 0
        self.load_version = 0
        self.log = ChangeLog()
        self._ring = HashRing(vnodes)
        self._clock = clock
        self._on_change = on_change
        self._on_version = on_version
        self._workers: dict[str, WorkerInfo] = {}
        self._num_draining = 0
        self._dirty: set[str] = set()  # workers whose ring state may differ from what they want
        self._dirty_since = 0.0        # when the first of them changed: the old ring retired then
        self._changed_at: dict[str, int] = {}  # worker -> version of its last change
        self._load_at: dict[str, int] = {}     # worker -> load_version of its last load change
        self._gone: OrderedDict[str, int] = OrderedDict()  # removed worker -> version then
        self._gone_floor = 0  # deltas from versions below this are no longer possible

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    @property
    def ring(self) -> HashRing:
        """Committed now, new workers' points included (a merge on this call if any are pending)."""
        self.commit(defer=False)
        return self._ring

    @property
    def committed_ring(self) -> HashRing:
        """As last committed: what routers have (for the point builder; no merge here)."""
        return self._ring

    @property
    def num_active(self) -> int:
        return len(self._workers) - self._num_draining

    @property
    def num_draining(self) -> int:
        return self._num_draining

    @property
    def num_changes_kept(self) -> int:
        self.commit()
        return len(self.log)

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
        rejoins the ring. O(1): the ring takes the change at the next read."""
        now = self._clock()
        state: WorkerState = "draining" if draining else "active"
        names = tuple(served_model_names)
        info = self._workers.get(worker_id)
        if info is None:
            info = WorkerInfo(worker_id, address, model_name, registered_at=now, last_heartbeat=now,
                              state=state, served_model_names=names, max_model_len=max_model_len)
            self._add(info)
            return info
        info.last_heartbeat = now
        self._update(info, address, model_name, names, max_model_len, state)
        return info

    def drain(self, worker_id: str) -> WorkerInfo:
        """Takes an active worker off the ring at once; it stays registered (heartbeats and the
        TTL still apply) until it deregisters or expires. Idempotent."""
        info = self.get(worker_id)
        if info.state == "active":
            self._set_state(info, "draining")
        return info

    def heartbeat(self, worker_id: str, load: int | None = None) -> WorkerInfo:
        """`load`: the worker's requests in progress; a report that changes it bumps `load_version`."""
        info = self.get(worker_id)
        info.last_heartbeat = self._clock()
        if load is not None:
            changed = load != info.load
            info.load = load
            info.load_reports += 1
            if changed:
                self.load_version += 1
                self._load_at[worker_id] = self.load_version
                self._notify()
        return info

    def deregister(self, worker_id: str) -> bool:
        """Returns False for an unknown worker, so a retried shutdown call is harmless."""
        if worker_id not in self._workers:
            return False
        self._remove(worker_id, "leave")
        return True

    def expire(self) -> list[str]:
        """Drops workers silent for longer than ttl_s, and ring changes older than the handoff
        window; returns the dropped workers' ids."""
        expired = self._silent(self._clock() - self.ttl_s)
        for worker_id in expired:
            self._remove(worker_id, "expire")
        self.commit()  # the sweep: new workers' points are left to the builder
        return expired

    def _silent(self, since: float) -> list[str]:
        """The workers expire() drops: silent since before `since` (sorted)."""
        return sorted(w for w, info in self._workers.items() if info.last_heartbeat < since)

    def settling(self, uptime_s: float) -> bool:
        """Whether the ring may still lack workers after a restart: until every worker had a TTL
        to register again (routers keep their last ring meanwhile)."""
        return uptime_s < self.ttl_s

    def pending_new(self) -> list[str]:
        """Workers waiting to go on the ring that have no points on it yet (sorted)."""
        return sorted(w for w in self._dirty if w in self._workers and self._workers[w].state == "active"
                      and not self._ring.is_member(w))

    def commit(self, merged: tuple[list[str], Points] | None = None, defer: bool | None = None) -> None:
        """Applies pending ring changes in one batch (one log entry), and moves the handoff window.
        `merged`: (pending_new(), the ring's merged_with(them)) computed off the loop. `defer`
        (default: defer_new_points): leave workers without points pending, not merge them here."""
        now = self._clock()
        if self._dirty:
            want = {w: w in self._workers and self._workers[w].state == "active" for w in self._dirty}
            ready = [w for w in (merged[0] if merged else []) if want.get(w)]
            ready_set = set(ready)
            held = {w for w, active in want.items() if active and not self._ring.is_member(w)
                    and w not in ready_set} if (self.defer_new_points if defer is None else defer) else set()
            on = ready + [w for w, active in want.items() if active and w not in ready_set and w not in held]
            off = [w for w, active in want.items() if not active and self._ring.is_member(w)]
            self._dirty = held
            changed = self._ring.update(on=on, off=off, merged=merged)
            if changed:
                self.log.record(self._dirty_since, [w for w in on if w in changed],
                                [w for w in off if w in changed], num_active_after=self._ring.num_active)
                self._bump_version()
                for worker_id in changed & self._workers.keys():
                    self._changed_at[worker_id] = self.version  # its record's state changed
            self._dirty_since = now
        before = self.log.first_seq
        self.log.drop(before_at=now - self.handoff_window_s)
        if self.log.first_seq != before:
            self._bump_version()

    def route(self, seq_id: str, exclude: Collection[str] = ()) -> Route:
        """The key's owner on the current ring, skipping `exclude` (workers the caller could not
        reach), and its earlier owners within the handoff window; excluded ones are never listed."""
        excluded = frozenset(exclude)
        ring = self.ring  # a lookup sees every registered worker (gateways route by themselves)
        try:
            worker_id = ring.owner(seq_id, excluded)
        except EmptyRingError:
            excluded_all = bool(excluded) and len(ring) > 0
            raise NoWorkers("every active worker is excluded" if excluded_all
                            else "no worker is active") from None
        addresses = {w: info.address for w, info in self._workers.items()}
        previous = self.log.previous_owners(seq_id, ring, addresses, skip=excluded | {worker_id})
        return Route(worker_id, self._workers[worker_id].address, self.epoch, previous)

    def state(self, after: int = -1, seq: int = 0, load_after: int = -1) -> dict:
        """What a router needs to route by itself (the fields of schemas.RingState): what changed
        since its `after` version, ring change `seq` and `load_after`, or everything (`full`)
        when it has nothing or is too far behind."""
        self.commit()
        now = self._clock()
        full = after < self._gone_floor or after > self.version or seq > self.log.next_seq
        # A delta scans two dicts (microseconds at a thousand workers); nothing is sorted.
        workers = self.workers() if full else \
            [self._workers[w] for w, v in self._changed_at.items() if v > after and w in self._workers]
        changes = [e for e in self.log.entries if full or e.seq >= seq]
        loads = workers if full else \
            [self._workers[w] for w, v in self._load_at.items() if v > load_after and w in self._workers]
        return {"full": full, "version": self.version, "load_version": self.load_version,
                "epoch": self.epoch, "vnodes": self._ring.vnodes,
                "workers": [self._record(w, now) for w in workers],
                "removed": [] if full else [w for w, v in self._gone.items() if v > after],
                "first_seq": self.log.first_seq, "next_seq": self.log.next_seq,
                "changes": [{"seq": e.seq, "toggles": [list(t) for t in e.toggles],
                             "num_active_before": e.num_active_before} for e in changes],
                "loads": [{"worker_id": w.worker_id, "load": w.load, "load_reports": w.load_reports}
                          for w in loads]}

    def _record(self, w: WorkerInfo, now: float) -> dict:
        """`state` as on the ring: a joining worker whose points are still being built is not
        active for routers yet (its ring change, and its record again, come with the build)."""
        return {"worker_id": w.worker_id, "address": w.address, "model_name": w.model_name,
                "state": "active" if w.worker_id in self._ring else "draining", "age_s": round(now - w.registered_at, 3),
                "last_heartbeat_age_s": round(now - w.last_heartbeat, 3), "load": w.load,
                "load_reports": w.load_reports, "served_model_names": list(w.served_model_names),
                "max_model_len": w.max_model_len}

    def _add(self, info: WorkerInfo) -> None:
        self._workers[info.worker_id] = info
        self._num_draining += info.state == "draining"
        self._gone.pop(info.worker_id, None)
        self._mark(info.worker_id)
        self._changed("drain" if info.state == "draining" else "join", info)

    def _update(self, info: WorkerInfo, address: str, model_name: str | None, names: tuple[str, ...],
                max_model_len: int | None, state: WorkerState) -> None:
        """Moves a known worker (address, model names) and switches its state; no-op if unchanged."""
        moved = (info.address, info.model_name, info.served_model_names, info.max_model_len) != \
            (address, model_name, names, max_model_len)
        info.address, info.model_name = address, model_name
        info.served_model_names, info.max_model_len = names, max_model_len
        if info.state != state:
            self._set_state(info, state)
        elif moved:
            self._changed("update", info)

    def _mark(self, worker_id: str) -> None:
        if not self._dirty:
            self._dirty_since = self._clock()
        self._dirty.add(worker_id)

    def _set_state(self, info: WorkerInfo, state: WorkerState) -> None:
        self._num_draining += (state == "draining") - (info.state == "draining")
        info.state = state
        self._mark(info.worker_id)
        self._changed("join" if state == "active" else "drain", info)

    def _remove(self, worker_id: str, change: Change) -> None:
        info = self._workers.pop(worker_id)
        self._num_draining -= info.state == "draining"
        self._mark(worker_id)
        self._changed(change, info)
        self._changed_at.pop(worker_id, None)
        self._load_at.pop(worker_id, None)
        self._gone[worker_id] = self.version
        while len(self._gone) > MAX_GONE_KEPT:
            _, self._gone_floor = self._gone.popitem(last=False)

    def _changed(self, change: Change, info: WorkerInfo) -> None:
        self.epoch += 1
        log.info("worker %s %s (%s, %s): epoch %d, %d workers", info.worker_id, change,
                 info.address, info.state, self.epoch, len(self._workers))
        if self._on_change is not None:
            self._on_change(change, info.worker_id, self.epoch)
        self._bump_version()
        self._changed_at[info.worker_id] = self.version

    def _bump_version(self) -> None:
        self.version += 1
        self._notify()

    def _notify(self) -> None:
        if self._on_version is not None:
            self._on_version(self.version)
