"""The gateway's own copy of the coordinator's routing state, built from a RingSnapshot with the
coordinator's pure ring and previous-owner code, so both always agree on owners. Pure: no I/O.

Rings are cached by their worker set: a snapshot that only reports loads, or adds one retired
ring, reuses every ring it already has (a ring of 4 workers at 2000 points costs ~10 ms to build).
"""

from collections.abc import Collection, Iterable

from services.common.schemas import RingSnapshot, RingWorker, RouteResponse, WorkerRef
from services.coordinator.membership import MAX_PREVIOUS, Peer, previous_owners
from services.coordinator.ring import EmptyRingError, HashRing


class RingCache:
    def __init__(self) -> None:
        self._rings: dict[tuple[frozenset[str], int], HashRing] = {}

    def ring(self, workers: Iterable[str], vnodes: int) -> HashRing:
        key = (frozenset(workers), vnodes)
        if key not in self._rings:
            self._rings[key] = HashRing.of(key[0], vnodes)
        return self._rings[key]

    def keep_only(self, rings: Iterable[HashRing]) -> None:
        kept = {id(ring) for ring in rings}
        self._rings = {k: r for k, r in self._rings.items() if id(r) in kept}


class RingView:
    def __init__(self, snapshot: RingSnapshot, cache: RingCache) -> None:
        self.snapshot = snapshot
        self.workers: dict[str, RingWorker] = {w.worker_id: w for w in snapshot.workers}
        self.active = [w.worker_id for w in snapshot.workers if w.state == "active"]
        self.ring = cache.ring(self.active, snapshot.vnodes)
        self.retired = [cache.ring(ids, snapshot.vnodes) for ids in snapshot.retired]
        self.addresses = {w.worker_id: w.address for w in snapshot.workers}
        cache.keep_only([self.ring, *self.retired])

    @property
    def version(self) -> int:
        return self.snapshot.version

    @property
    def epoch(self) -> int:
        return self.snapshot.epoch

    def candidates(self, key: str, exclude: Collection[str] = ()) -> list[str]:
        """Active workers not excluded, the key's owner first, then clockwise (where it spills)."""
        return list(self.ring.walk(key, exclude))

    def owner(self, key: str, exclude: Collection[str] = ()) -> str:
        """EmptyRingError when no active worker is left."""
        return self.ring.owner(key, exclude)

    def route(self, key: str, worker_id: str, exclude: Collection[str] = (),
              first_sources: Iterable[str] = ()) -> RouteResponse:
        """A route to `worker_id`, with where the key's KV may be: `first_sources` (e.g. the owner
        a spilled request passed by), then its owners on the retired rings, newest first."""
        if worker_id not in self.addresses:
            raise EmptyRingError(f"worker {worker_id!r} is not registered")
        skip = set(exclude) | {worker_id}
        first = [Peer(w, self.addresses[w]) for w in dict.fromkeys(first_sources)
                 if w in self.addresses and w not in skip]
        skip |= {peer.worker_id for peer in first}
        previous = (first + list(previous_owners(key, self.retired, self.addresses, skip)))[:MAX_PREVIOUS]
        return RouteResponse(seq_id=key, worker_id=worker_id, address=self.addresses[worker_id],
                             epoch=self.epoch,
                             previous=[WorkerRef(worker_id=p.worker_id, address=p.address) for p in previous])
