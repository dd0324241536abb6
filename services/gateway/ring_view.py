"""The gateway's own copy of the coordinator's routing state, kept by applying the coordinator's
deltas (services/common: the same ring and change-log code, so both always agree on owners).
Pure: no I/O.

A delta costs the gateway what changed, not the cluster's size: worker records are replaced one by
one, ring changes appended to the log, and only workers new to the ring cost a merge of their
points, computed off the event loop (`plan` then `merged_with` in a thread, then `apply`).
"""

from collections.abc import Collection, Iterable, Iterator

from services.common.hash_ring import EmptyRingError, HashRing, Points
from services.common.ring_history import MAX_PREVIOUS, ChangeLog, Entry, Peer
from services.common.schemas import RingState, RingWorker, RouteResponse, WorkerRef


class Plan:
    """Which workers a state turns on and off on the ring; `new` ones need points first."""

    def __init__(self, on: list[str], off: list[str], new: list[str]) -> None:
        self.on, self.off, self.new = on, off, new


class RingView:
    def __init__(self, instance: str, vnodes: int) -> None:
        self.instance = instance
        self.settling = False
        self.version = self.load_version = self.epoch = -1
        self.workers: dict[str, RingWorker] = {}
        self.addresses: dict[str, str] = {}
        self.draining: set[str] = set()
        self.ring = HashRing(vnodes)
        self.log = ChangeLog()

    @property
    def active(self) -> list[str]:
        return self.ring.workers

    @property
    def num_active(self) -> int:
        return self.ring.num_active

    def plan(self, state: RingState) -> Plan:
        """For a delta of this view's instance (or a full state on an empty view)."""
        named = {w for c in state.changes if c.seq >= self.log.next_seq for w, _ in c.toggles}
        records = {w.worker_id: w for w in state.workers}
        touched = list(dict.fromkeys([*records, *state.removed, *sorted(named)]))
        on = [w for w in touched if w in records and records[w].state == "active"]
        turned_on = set(on)  # not `w not in on`: a list, O(N^2) for a thousand joins (9 ms)
        off = [w for w in touched if w not in turned_on and (self.ring.is_member(w) or w in named)]
        new = [w for w in on + off if not self.ring.is_member(w)]
        return Plan(on, off, new)

    def apply(self, state: RingState, plan: Plan, merged: Points | None = None) -> None:
        """`merged`: self.ring.merged_with(plan.new), computed since the ring last changed."""
        for worker_id in state.removed:
            self.workers.pop(worker_id, None)
            self.addresses.pop(worker_id, None)
            self.draining.discard(worker_id)
        for worker in state.workers:
            self.workers[worker.worker_id] = worker
            self.addresses[worker.worker_id] = worker.address
            (self.draining.add if worker.state == "draining" else self.draining.discard)(worker.worker_id)
        for change in state.changes:
            if change.seq >= self.log.next_seq:
                if not self.log.entries:
                    self.log.next_seq = change.seq
                self.log.append(Entry(change.seq, 0.0, tuple(change.toggles), change.num_active_before))
        self.ring.update(on=plan.on, off=plan.off, merged=None if merged is None else (plan.new, merged))
        self.log.drop(before_seq=state.first_seq)  # the dropped workers' points: forget_points()
        self.log.next_seq = max(self.log.next_seq, state.next_seq)
        self.instance, self.settling = state.instance, state.settling
        self.version, self.load_version, self.epoch = state.version, state.load_version, state.epoch

    @classmethod
    def of(cls, state: RingState) -> "RingView":
        """A view built from a full state (seconds at a thousand workers: run it in a thread)."""
        view = cls(state.instance, state.vnodes)
        plan = view.plan(state)
        view.apply(state, plan, view.ring.merged_with(plan.new))
        view.log.forget_points(view.ring)  # in the caller's thread, as the whole build
        return view

    def candidates(self, key: str, exclude: Collection[str] = ()) -> Iterator[str]:
        """Active workers not excluded, the key's owner first, then clockwise (where it spills):
        lazy, so taking the first few costs O(log points)."""
        return self.ring.walk(key, exclude)

    def owner(self, key: str, exclude: Collection[str] = ()) -> str:
        """EmptyRingError when no active worker is left."""
        return self.ring.owner(key, exclude)

    def route(self, key: str, worker_id: str, exclude: Collection[str] = (),
              first_sources: Iterable[str] = ()) -> RouteResponse:
        """A route to `worker_id`, with where the key's KV may be: `first_sources` (e.g. the owner
        a spilled request passed by), then its owners on the rings of the handoff window."""
        if worker_id not in self.addresses:
            raise EmptyRingError(f"worker {worker_id!r} is not registered")
        skip = set(exclude) | {worker_id}
        first = [Peer(w, self.addresses[w]) for w in dict.fromkeys(first_sources)
                 if w in self.addresses and w not in skip]
        skip |= {peer.worker_id for peer in first}
        previous = (first + list(self.log.previous_owners(key, self.ring, self.addresses, skip)))[:MAX_PREVIOUS]
        # Built from this view's own records: not validated again (a third of this method's time)
        return RouteResponse.model_construct(
            seq_id=key, worker_id=worker_id, address=self.addresses[worker_id], epoch=self.epoch,
            previous=[WorkerRef.model_construct(worker_id=p.worker_id, address=p.address) for p in previous])
