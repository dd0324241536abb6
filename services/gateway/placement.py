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
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from services.common.schemas import LoadReport, RingWorker, RouteResponse
from services.common.hash_ring import EmptyRingError
from services.gateway.ring_view import RingView

REMEMBERED_KEYS = 65_536  # keys whose last worker is remembered (a KV source when they move)


class LoadEstimates:
    def __init__(self) -> None:
        self.in_flight: Counter[str] = Counter()  # this gateway's requests open at each worker
        self._reports: dict[str, tuple[int, int, int]] = {}  # worker -> (report no., load, in_flight then)
        self._loads: dict[str, int] = {}  # worker -> load(worker), kept so that `total` is O(1)
        self.total = 0

    def started(self, worker_id: str) -> None:
        self.in_flight[worker_id] += 1
        self._refresh(worker_id)

    def finished(self, worker_id: str) -> None:
        self.in_flight[worker_id] -= 1
        if self.in_flight[worker_id] <= 0:
            del self.in_flight[worker_id]
        self._refresh(worker_id)

    def observe(self, reports: Iterable[RingWorker | LoadReport], full: bool = True) -> None:
        """Takes new load reports: every worker's (`full`: the others are forgotten) or changed ones."""
        if full:
            known = set(self._reports)
            self._reports = {}
        for w in reports:
            known_report = self._reports.get(w.worker_id)
            fresh = known_report is None or known_report[0] != w.load_reports
            self._reports[w.worker_id] = (w.load_reports, w.load, self.in_flight[w.worker_id]) \
                if fresh else known_report
            self._refresh(w.worker_id)
        if full:
            for worker_id in known - set(self._reports):
                self._refresh(worker_id)

    def forget(self, worker_ids: Iterable[str]) -> None:
        for worker_id in worker_ids:
            self._reports.pop(worker_id, None)
            self._refresh(worker_id)

    def load(self, worker_id: str) -> int:
        return self._loads.get(worker_id, 0)

    def _refresh(self, worker_id: str) -> None:
        _, reported, ours_then = self._reports.get(worker_id, (0, 0, 0))
        load = self.in_flight[worker_id] + max(0, reported - ours_then)
        self.total += load - self._loads.get(worker_id, 0)
        if load:
            self._loads[worker_id] = load
        else:
            self._loads.pop(worker_id, None)


def bounded_choice(candidates: list[str], loads: dict[str, int], factor: float) -> str:
    """The first candidate (ring order) whose load is at most factor x (total + 1) / n. The least
    loaded one always qualifies for factor >= 1, so the fallback only guards factor < 1."""
    bound = factor * (sum(loads.values()) + 1) / len(loads)
    return first_under(iter(candidates), loads.__getitem__, bound, [])


def first_under(candidates: Iterator[str], load_of: Callable[[str], int], bound: float, passed: list[str]) -> str:
    """The first candidate whose load is at most `bound`, else the least loaded; `passed` gets the
    ones it went by. Reads candidates lazily: at factor >= 1 it stops within a few of them."""
    for worker_id in candidates:
        if load_of(worker_id) <= bound:
            return worker_id
        passed.append(worker_id)
    return min(passed, key=load_of)


@dataclass(frozen=True)
class Placement:
    route: RouteResponse
    decision: str  # owner, spilled, rerouted, round_robin (the gateway metric's label)


def _no_worker(exclude: Collection[str]) -> str:
    return "no active worker" if not exclude else "every active worker is excluded"


class Placer:
    def __init__(self, routing: str = "affinity", load_factor: float = 0.0) -> None:
        self.routing = routing
        self.load_factor = load_factor
        self.loads = LoadEstimates()
        self._turns = itertools.count()
        self._last: OrderedDict[str, str] = OrderedDict()  # key -> worker it was last sent to

    def place(self, view: RingView, key: str, exclude: Collection[str] = ()) -> Placement:
        """EmptyRingError when no active worker is left after `exclude`."""
        if self.routing != "round_robin" and not self.load_factor:  # the default: the owner, one lookup
            owner = worker_id = self._owner(view, key, exclude)
            decision = "rerouted" if exclude else "owner"
        else:
            owner, worker_id, decision = self._choose(view, key, exclude)
        # Where the key's KV may be besides its ring history: the worker it last went to (a spill)
        # and its owner (when this request spills past it).
        sources = [self._last.get(key, worker_id), owner]
        self._remember(key, worker_id)
        return Placement(view.route(key, worker_id, exclude, first_sources=sources), decision)

    @staticmethod
    def _owner(view: RingView, key: str, exclude: Collection[str]) -> str:
        try:
            return view.owner(key, exclude)
        except EmptyRingError:
            raise EmptyRingError(_no_worker(exclude)) from None

    def _choose(self, view: RingView, key: str, exclude: Collection[str]) -> tuple[str, str, str]:
        """(owner, chosen worker, decision) for round robin or bounded loads."""
        candidates = view.candidates(key, exclude)
        owner = next(candidates, None)
        if owner is None:
            raise EmptyRingError(_no_worker(exclude))
        if self.routing == "round_robin":
            ordered = [owner, *candidates]
            worker_id, decision = ordered[next(self._turns) % len(ordered)], "round_robin"
        else:
            worker_id = first_under(itertools.chain([owner], candidates), self.loads.load,
                                    self._bound(view, exclude), [])
            decision = "owner" if worker_id == owner else "spilled"
        if exclude and decision == "owner":
            decision = "rerouted"
        return owner, worker_id, decision

    def _bound(self, view: RingView, exclude: Collection[str]) -> float:
        """factor x (total + 1) / n over the active workers not excluded: O(draining + excluded)."""
        off = view.draining | {w for w in exclude if w in view.ring}
        total = self.loads.total - sum(self.loads.load(w) for w in off)
        num_workers = view.num_active - sum(1 for w in exclude if w in view.ring)
        return self.load_factor * (total + 1) / max(num_workers, 1)

    def _remember(self, key: str, worker_id: str) -> None:
        self._last[key] = worker_id
        self._last.move_to_end(key)
        if len(self._last) > REMEMBERED_KEYS:
            self._last.popitem(last=False)
