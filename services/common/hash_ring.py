"""Consistent-hash ring over the key space [0, 2**32), shared by the coordinator and the gateway so
both always agree on owners. Pure: no I/O, no framework imports.

Each worker owns `vnodes` points; a key belongs to the first point at or clockwise after its MD5
hash, wrapping past 2**32. Balance comes from many points (8192 by default: max/mean share within
1.05 up to 2000 workers; README, "Control plane at scale", compares the measured alternatives),
which stay cheap because they live in two flat numpy arrays (4 + 2 bytes a point) rather than
Python tuples, and a worker's points come from one vectorised pass (splitmix64 over an MD5 seed).

A ring holds *members*: active workers (they own keys) and inactive ones whose points are kept
for the handoff window (ring_history reads where their arcs were). Turning a member on or off is
O(1); only a new member's points cost an O(points) merge, and a batch of them costs one merge.
"""

import bisect
import hashlib
import heapq
from collections.abc import Collection, Iterable, Iterator
from typing import NamedTuple

import numpy as np

KEY_SPACE = 2**32
DEFAULT_VNODES = 8192
MAX_MEMBERS = 65_535  # owners are uint16 member numbers
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
SHARES_SLICE = 1 << 20
MERGE_BATCH = 64  # new workers' points merged at a time (bounds the temporaries)


class EmptyRingError(LookupError):
    """owner() was asked on a ring with no workers, or with every worker excluded."""


def hash_key(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "big")


def points_of(worker_id: str, vnodes: int) -> np.ndarray:
    """The worker's points, unsorted: [vnodes] uint32. splitmix64 (Steele et al.) of seed + i x golden
    ratio, seed from MD5 so every process computes the same points."""
    seed = np.uint64(int.from_bytes(hashlib.md5(worker_id.encode()).digest()[:8], "big"))
    with np.errstate(over="ignore"):
        x = seed + np.arange(1, vnodes + 1, dtype=np.uint64) * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(32)).astype(np.uint32)


class Points(NamedTuple):
    """The ring's sorted points and, for each, its member number. Never mutated: replaced whole."""
    hashes: np.ndarray  # [P] uint32, ascending
    owners: np.ndarray  # [P] uint16, member numbers


class PointViews(NamedTuple):
    """Memoryviews of one Points: a key's lookup bisects these with the stdlib rather than calling
    into numpy, whose dispatch code is the larger cost of a lookup on a cold CPU cache (a request
    after an idle spell: README, "Routing tax")."""
    points: Points
    hashes: memoryview
    owners: memoryview


EMPTY = Points(np.empty(0, np.uint32), np.empty(0, np.uint16))


class Forgotten(NamedTuple):
    """HashRing.without(): the member numbers dropped, the points it read, the points left."""
    numbers: tuple[int, ...]
    base: Points
    points: Points


def merge(old: Points, new: Points) -> tuple[Points, np.ndarray]:
    """Both sorted; O(len(old) + len(new)) (np.insert would also argsort the places). Also returns
    where the new points went."""
    at = np.searchsorted(old.hashes, new.hashes) + np.arange(len(new.hashes))  # their final places
    total = len(old.hashes) + len(new.hashes)
    hashes, owners = np.empty(total, np.uint32), np.empty(total, np.uint16)
    rest = np.ones(total, bool)
    rest[at] = False
    hashes[at], owners[at] = new.hashes, new.owners
    hashes[rest], owners[rest] = old.hashes, old.owners
    return Points(hashes, owners), at


class HashRing:
    def __init__(self, vnodes: int = DEFAULT_VNODES):
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self._points = EMPTY
        self._views = PointViews(EMPTY, memoryview(EMPTY.hashes), memoryview(EMPTY.owners))
        self._names: list[str | None] = []   # member number -> worker id (None: free)
        self._free: list[int] = []           # a heap of the free member numbers
        self._numbers: dict[str, int] = {}   # worker id -> member number
        self._active = bytearray()           # member number -> 1 when it owns keys
        self._num_active = 0
        self.generation = 0  # grows with every change of members, numbers or states (cache key)

    def __len__(self) -> int:
        """Points of active workers."""
        return self._num_active * self.vnodes

    def __contains__(self, worker_id: object) -> bool:
        number = self._numbers.get(worker_id)  # type: ignore[arg-type]
        return number is not None and self._active[number] == 1

    @property
    def workers(self) -> list[str]:
        return sorted(w for w, n in self._numbers.items() if self._active[n])

    @property
    def members(self) -> list[str]:
        """Active workers and those kept for the handoff window."""
        return sorted(self._numbers)

    @property
    def num_active(self) -> int:
        return self._num_active

    def is_member(self, worker_id: str) -> bool:
        return worker_id in self._numbers

    @property
    def num_points(self) -> int:
        return len(self._points.hashes)

    @property
    def num_numbers(self) -> int:
        """Member numbers in use or free: rows of an array indexed by member number."""
        return len(self._names)

    def number_of(self, worker_id: str) -> int | None:
        return self._numbers.get(worker_id)

    def name_of(self, number: int) -> str | None:
        return self._names[number]

    def active_mask(self) -> np.ndarray:
        """[num_numbers] uint8: 1 where the member number is active."""
        return np.frombuffer(bytes(self._active), np.uint8)

    @property
    def points(self) -> Points:
        """The current arrays: a caller that merged off the loop checks they did not change since."""
        return self._points

    def add(self, worker_id: str) -> bool:
        """Returns False when the worker was already active (no change)."""
        return bool(self.update(on=[worker_id]))

    def remove(self, worker_id: str) -> bool:
        """Turns the worker off and drops its points. False when it was not active."""
        if worker_id not in self._numbers:
            return False
        changed = bool(self.update(off=[worker_id]))
        self.forget([worker_id])
        return changed

    def update(self, on: Iterable[str] = (), off: Iterable[str] = (),
               merged: tuple[list[str], Points] | None = None) -> set[str]:
        """Turns workers on and off (off keeps their points); returns those whose state changed.
        `merged`: (new members, merged_with(them)), computed earlier off the event loop on these
        very points; used when the new members are exactly those."""
        on, off = list(dict.fromkeys(on)), list(dict.fromkeys(off))
        new = [w for w in on + off if w not in self._numbers]  # an `off` one is kept inactive
        if new:
            ready = merged is not None and list(merged[0]) == new
            self._points = merged[1] if ready else self.merged_with(new)
            for worker_id in new:
                self._number(worker_id)
            self.generation += 1
        changed = set()
        for worker_id, state in [(w, 1) for w in on] + [(w, 0) for w in off]:
            number = self._numbers.get(worker_id)
            if number is not None and self._active[number] != state:
                self._active[number] = state
                self._num_active += 1 if state else -1
                changed.add(worker_id)
        self.generation += bool(changed)
        return changed

    def merged_with(self, new_members: Collection[str]) -> Points:
        """The points with those of `new_members` merged in, numbered as update() will number
        them. Pure (reads the current points): safe to run in a thread while the loop reads.
        Merged MERGE_BATCH workers at a time: a thousand at once (a coordinator restart, a
        gateway's first sync) held 300 MB of temporaries; in batches, the old and new arrays and
        a few MB."""
        new_members = [w for w in dict.fromkeys(new_members) if w not in self._numbers]
        if not new_members:
            return self._points
        free = sorted(self._free)[:len(new_members)]
        numbers = free + list(range(len(self._names), len(self._names) + len(new_members) - len(free)))
        if numbers[-1] > MAX_MEMBERS:
            raise ValueError(f"a ring holds at most {MAX_MEMBERS} workers")
        names = dict(zip(numbers, new_members))
        points = self._points
        for start in range(0, len(new_members), MERGE_BATCH):
            batch = zip(new_members[start:start + MERGE_BATCH], numbers[start:start + MERGE_BATCH])
            # One sort of (point << 16 | member number): no index array, ties next to each other.
            keys = np.concatenate([(points_of(w, self.vnodes).astype(np.uint64) << np.uint64(16)) | np.uint64(n)
                                   for w, n in batch])
            keys.sort()
            points, at = merge(points, Points((keys >> np.uint64(16)).astype(np.uint32),
                                              (keys & np.uint64(0xFFFF)).astype(np.uint16)))
            points = self._fix_ties(points, at, lambda n: names.get(n) or self._names[n])
        return points

    def without(self, worker_ids: Iterable[str]) -> Forgotten:
        """The points less those of the given inactive members: O(points), so callers on an event
        loop run it in a thread (pure: reads the current arrays) and hand the result to forget()."""
        base, numbers = self._points, self._forgettable(worker_ids)
        if not numbers:
            return Forgotten(numbers, base, base)
        dropped = np.zeros(len(self._names), bool)  # a table lookup: np.isin would sort the owners
        dropped[list(numbers)] = True
        keep = ~dropped[base.owners]
        return Forgotten(numbers, base, Points(base.hashes[keep], base.owners[keep]))

    def forget(self, worker_ids: Iterable[str], computed: Forgotten | None = None) -> bool:
        """Drops the points of inactive members (their handoff window ended). `computed`: without()
        of the same workers, taken off the loop; if the ring changed since (a merge, a worker back
        on), nothing is dropped and False returned: the caller tries again later."""
        worker_ids = list(worker_ids)
        if computed is None:
            computed = self.without(worker_ids)
        elif computed.base is not self._points or computed.numbers != self._forgettable(worker_ids):
            return False
        self._points = computed.points
        self.generation += 1
        for number in computed.numbers:
            del self._numbers[self._names[number]]
            self._names[number] = None
            heapq.heappush(self._free, number)
        return True

    def _forgettable(self, worker_ids: Iterable[str]) -> tuple[int, ...]:
        return tuple(sorted(self._numbers[w] for w in set(worker_ids)
                            if w in self._numbers and not self._active[self._numbers[w]]))

    def owner(self, key: str, exclude: Collection[str] = ()) -> str:
        """The worker of the first active point at or clockwise after the key's hash, skipping
        excluded workers: the key's owner as if the excluded workers had left the ring."""
        if not exclude and self._num_active:  # the common case: one binary search
            number = self.point_views().owners[self.slot(key)]
            if self._active[number]:
                return self._names[number]
        for worker_id in self.walk(key, exclude):
            return worker_id
        raise EmptyRingError("the hash ring has no workers" if not self._num_active
                             else "every worker on the hash ring is excluded")

    def point_views(self) -> PointViews:
        views = self._views
        if views.points is not self._points:
            points = self._points
            views = self._views = PointViews(points, memoryview(points.hashes), memoryview(points.owners))
        return views

    def slot(self, key: str) -> int:
        """The index of the key's point: the first at or clockwise after its hash (0 on an empty
        ring)."""
        hashes = self.point_views().hashes
        return bisect.bisect_left(hashes, hash_key(key)) % len(hashes) if len(hashes) else 0

    def walk(self, key: str, exclude: Collection[str] = ()) -> Iterator[str]:
        """Each active worker once, in the order of their first point clockwise from the key's hash:
        the owner first, then the workers a bounded-load router spills to. Lazy: taking the first
        few costs O(log points), not a lap of the ring."""
        excluded = frozenset(exclude)
        wanted = self._num_active - sum(1 for w in excluded if w in self)
        if wanted == 0:
            return
        for worker_id, active in self.walk_members(key):
            if active and worker_id not in excluded:
                yield worker_id
                wanted -= 1
                if wanted == 0:
                    return

    def walk_members(self, key: str) -> Iterator[tuple[str, bool]]:
        """Every member once (active or not) with its state, clockwise from the key's hash. Reads
        the owners in blocks growing from 16 points (the owner is nearly always in the first few),
        each block one list: a point cost ~0.3 µs read one by one from numpy, and the handoff
        window's earlier owners can take hundreds of points after a start from empty."""
        hashes, owners = self._points
        num_points = len(hashes)
        if not num_points:
            return
        start = self.slot(key)
        seen: set[int] = set()
        num_members = len(self._numbers)
        offset, size = 0, 16
        while offset < num_points:
            lo, take = (start + offset) % num_points, min(size, num_points - offset)
            block = owners[lo:lo + take] if lo + take <= num_points else \
                np.concatenate([owners[lo:], owners[:lo + take - num_points]])
            for number in block.tolist():
                if number not in seen:
                    seen.add(number)
                    yield self._names[number], self._active[number] == 1
                    if len(seen) == num_members:
                        return
            offset, size = offset + take, min(size * 4, 1 << 16)

    @classmethod
    def of(cls, workers: Iterable[str], vnodes: int = DEFAULT_VNODES) -> "HashRing":
        ring = cls(vnodes)
        ring.update(on=sorted(set(workers)))
        return ring

    def copy(self) -> "HashRing":
        ring = HashRing(self.vnodes)
        ring._points = self._points
        ring._names, ring._numbers, ring._free = list(self._names), dict(self._numbers), list(self._free)
        ring._active, ring._num_active = bytearray(self._active), self._num_active
        ring.generation = self.generation
        return ring

    def shares(self) -> dict[str, float]:
        """Fraction of the key space each active worker owns; sums to 1 on a non-empty ring. Reads
        the points once (safe in a thread) in slices, so its temporaries stay a few MB at 8M points."""
        hashes, owners = self._points
        active = self.active_mask().astype(bool)
        mask = active[owners] if len(owners) else np.zeros(0, bool)
        hashes, owners = hashes[mask], owners[mask]
        if not len(hashes):
            return {}
        # Point i owns the arc (previous point, point]; the first one's previous point is the last
        # one, one lap back (uint32 differences wrap modulo 2**32: exactly that arc). One distinct
        # point (one worker, one vnode) owns the whole lap.
        totals = np.zeros(len(self._names), np.float64)
        for start in range(0, len(hashes), SHARES_SLICE):
            end = min(start + SHARES_SLICE, len(hashes))
            arcs = np.diff(hashes[start - 1:end] if start else np.concatenate([hashes[-1:], hashes[:end]]))
            totals += np.bincount(owners[start:end], weights=arcs, minlength=len(self._names))
        if hashes[0] == hashes[-1]:
            totals[:] = 0
            totals[owners[0]] = KEY_SPACE
        return {w: float(totals[n]) / KEY_SPACE for w, n in sorted(self._numbers.items()) if self._active[n]}

    def _number(self, worker_id: str) -> int:
        """The lowest free member number (as merged_with numbers new members), else a new one."""
        if self._free:
            number = heapq.heappop(self._free)
            self._names[number] = worker_id
        else:
            number = len(self._names)
            self._names.append(worker_id)
            self._active.append(0)
        self._numbers[worker_id] = number
        return number

    @staticmethod
    def _fix_ties(points: Points, at: np.ndarray, name_of) -> Points:
        """Equal points (two workers' 32-bit hashes collide: about P^2 / 2^33 of them, thousands
        at a thousand workers) ordered by worker id, so every process resolves them alike whatever
        the numbering. Only runs that hold a new point (at `at`) can be out of order."""
        hashes, owners = points
        last = len(hashes) - 1
        tied = at[((at > 0) & (hashes[at] == hashes[np.maximum(at - 1, 0)]))
                  | ((at < last) & (hashes[at] == hashes[np.minimum(at + 1, last)]))]
        if not len(tied):
            return points
        owners = owners.copy()
        for value in np.unique(hashes[tied]):  # each run re-sorted by name; a few points each
            start, end = int(hashes.searchsorted(value)), int(hashes.searchsorted(value, side="right"))
            owners[start:end] = sorted(owners[start:end].tolist(), key=name_of)
        return Points(hashes, owners)
