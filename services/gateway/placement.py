"""Which worker a request goes to. Pure: no I/O.

- affinity: the key's owner on the ring (where its KV is);
- bounded loads (GATEWAY_LOAD_FACTOR = c > 0, consistent hashing with bounded loads, Mirrokni et
  al.; KubeAI's CHWBL): the first worker clockwise from the key whose load is at most
  c x (total + 1) / n, so that after placing the request no worker holds more than c times the
  average plus one. A request that passes its owner is "spilled"; its history is in the session
  store and its new worker pulls the KV from the owner;
- round_robin: the next active worker in turn (a baseline for benchmarks).

Loads are estimates (LoadEstimates): this gateway's own requests in flight at the worker (exact),
plus the others' as of the worker's last report (its load minus this gateway's in-flight count
when the report arrived, at least 0). With one gateway that is exact whatever the report interval
(a report taken while requests were in transit does not lower it); with several, each sees the
others' requests one report (a heartbeat) late.
"""

import itertools
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from services.common.schemas import RingWorker, RouteResponse
from services.coordinator.ring import EmptyRingError
from services.gateway.ring_view import RingView

REMEMBERED_KEYS = 65_536  # keys whose last worker is remembered (a KV source when they move)


class LoadEstimates:
    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()  # this gateway's requests open at each worker
        self._reports: dict[str, tuple[int, int, int]] = {}  # worker -> (report no., load, in_flight then)

    def started(self, worker_id: str) -> None:
        self.in_flight[worker_id] += 1

    def finished(self, worker_id: str) -> None:
        self.in_flight[worker_id] -= 1
        if self.in_flight[worker_id] <= 0:
            del self.in_flight[worker_id]

    def observe(self, workers: Iterable[RingWorker]) -> None:
        """Takes the new load reports of a ring snapshot."""
        reports = {}
        for w in workers:
            known = self._reports.get(w.worker_id)
            fresh = known is None or known[0] != w.load_reports
            reports[w.worker_id] = (w.load_reports, w.load, self.in_flight[w.worker_id]) if fresh else known
        self._reports = reports

    def load(self, worker_id: str) -> int:
        _, reported, ours_then = self._reports.get(worker_id, (0, 0, 0))
        return self.in_flight[worker_id] + max(0, reported - ours_then)


def bounded_choice(candidates: list[str], loads: dict[str, int], factor: float) -> str:
    """The first candidate (ring order) whose load is at most factor x (total + 1) / n. The least
    loaded one always qualifies for factor >= 1, so the fallback only guards factor < 1."""
    bound = factor * (sum(loads.values()) + 1) / len(loads)
    for worker_id in candidates:
        if loads[worker_id] <= bound:
            return worker_id
    return min(candidates, key=loads.__getitem__)


@dataclass(frozen=True)
class Placement:
    route: RouteResponse
    decision: str  # owner, spilled, rerouted, round_robin (the gateway metric's label)


class Placer:
    def __init__(self, routing: str = "affinity", load_factor: float = 0.0) -> None:
        self.routing = routing
        self.load_factor = load_factor
        self.loads = LoadEstimates()
        self._turns = itertools.count()
        self._last: OrderedDict[str, str] = OrderedDict()  # key -> worker it was last sent to

    def place(self, view: RingView, key: str, exclude: Collection[str] = ()) -> Placement:
        """EmptyRingError when no active worker is left after `exclude`."""
        candidates = view.candidates(key, exclude)
        if not candidates:
            raise EmptyRingError("no active worker" if not exclude else "every active worker is excluded")
        if self.routing == "round_robin":
            worker_id, decision = candidates[next(self._turns) % len(candidates)], "round_robin"
        elif self.load_factor > 0:
            loads = {w: self.loads.load(w) for w in view.active if w not in exclude}
            worker_id = bounded_choice(candidates, loads, self.load_factor)
            decision = "owner" if worker_id == candidates[0] else "spilled"
        else:
            worker_id, decision = candidates[0], "owner"
        if exclude and decision == "owner":
            decision = "rerouted"
        # Where the key's KV may be besides its ring history: the worker it last went to (a spill)
        # and its owner (when this request spills past it).
        sources = [self._last.get(key, worker_id), candidates[0]]
        self._remember(key, worker_id)
        return Placement(view.route(key, worker_id, exclude, first_sources=sources), decision)

    def _remember(self, key: str, worker_id: str) -> None:
        self._last[key] = worker_id
        self._last.move_to_end(key)
        if len(self._last) > REMEMBERED_KEYS:
            self._last.popitem(last=False)
