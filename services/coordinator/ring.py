"""MD5 consistent-hash ring over the key space [0, 2**32). Pure: no I/O, no framework imports.

Each worker owns `vnodes` points hashed from "<worker_id>-vn-<i>"; a key belongs to the first
point at or clockwise after its hash, wrapping past 2**32 to the lowest point. MD5 rather than
Python's hash() so every process (coordinator replicas, tests, tools) agrees on ownership.
"""

import bisect
import functools
import hashlib
from collections.abc import Collection, Iterable, Iterator

KEY_SPACE = 2**32
# Points per worker. Random points balance slowly: with 4 workers the largest share is up to
# 1.14x the mean at 100 (Karger's paper) or 256 (KubeAI), still 1.11x at 500, 1.03x at 2000
# (measured over six worker-id sets). 2000 points cost 2000 MD5s per join, nothing per lookup.
DEFAULT_VNODES = 2000


class EmptyRingError(LookupError):
    """owner() was asked on a ring with no workers, or with every worker excluded."""


def hash_key(key: str) -> int:
    return int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "big")


def vnode_key(worker_id: str, index: int) -> str:
    return f"{worker_id}-vn-{index}"


@functools.lru_cache(maxsize=256)  # ~200 KB a worker at 2000 points
def _points_of(worker_id: str, vnodes: int) -> tuple[tuple[int, str], ...]:
    return tuple((hash_key(vnode_key(worker_id, i)), worker_id) for i in range(vnodes))


class HashRing:
    """`_points` and `_hashes` are replaced on every change, never mutated in place, so a copy()
    can share them: a snapshot costs O(workers), not O(points)."""

    def __init__(self, vnodes: int = DEFAULT_VNODES):
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self.vnodes = vnodes
        self._workers: set[str] = set()
        # (point, worker_id) sorted; worker_id breaks ties so a hash collision resolves the
        # same way in every process regardless of join order.
        self._points: list[tuple[int, str]] = []
        self._hashes: list[int] = []

    def __len__(self) -> int:
        return len(self._points)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._workers

    @property
    def workers(self) -> list[str]:
        return sorted(self._workers)

    def add(self, worker_id: str) -> bool:
        """Returns False when the worker was already on the ring (no change)."""
        if worker_id in self._workers:
            return False
        self._workers.add(worker_id)
        self._rebuild(self._points + list(_points_of(worker_id, self.vnodes)))
        return True

    def remove(self, worker_id: str) -> bool:
        """Returns False when the worker was not on the ring (no change)."""
        if worker_id not in self._workers:
            return False
        self._workers.discard(worker_id)
        self._rebuild([p for p in self._points if p[1] != worker_id])
        return True

    def owner(self, key: str, exclude: Collection[str] = ()) -> str:
        """The worker of the first point at or clockwise after the key's hash, skipping points of
        excluded workers: the key's owner as if the excluded workers had left the ring."""
        if not self._points:
            raise EmptyRingError("the hash ring has no workers")
        if not exclude:
            return self._points[bisect.bisect_left(self._hashes, hash_key(key)) % len(self._points)][1]
        for worker_id in self.walk(key, exclude):
            return worker_id
        raise EmptyRingError("every worker on the hash ring is excluded")

    def walk(self, key: str, exclude: Collection[str] = ()) -> Iterator[str]:
        """Each worker once, in the order of their first point clockwise from the key's hash: the
        owner first, then the workers a bounded-load router spills to."""
        excluded = frozenset(exclude)
        wanted = len(self._workers - excluded)
        seen: set[str] = set()
        num_points = len(self._points)
        start = bisect.bisect_left(self._hashes, hash_key(key))
        for offset in range(num_points):
            if len(seen) == wanted:
                return
            worker_id = self._points[(start + offset) % num_points][1]
            if worker_id not in seen and worker_id not in excluded:
                seen.add(worker_id)
                yield worker_id

    @classmethod
    def of(cls, workers: Iterable[str], vnodes: int = DEFAULT_VNODES) -> "HashRing":
        """A ring of these workers, built at once (points of each worker cached across rings)."""
        ring = cls(vnodes)
        ring._workers = set(workers)
        ring._rebuild([p for w in ring._workers for p in _points_of(w, vnodes)])
        return ring

    def copy(self) -> "HashRing":
        ring = HashRing(self.vnodes)
        ring._workers = set(self._workers)
        ring._points, ring._hashes = self._points, self._hashes
        return ring

    def shares(self) -> dict[str, float]:
        """Fraction of the key space each worker owns; sums to 1 on a non-empty ring."""
        totals = dict.fromkeys(self._workers, 0)
        if self._points and self._hashes[0] == self._hashes[-1]:
            # One distinct point (vnodes=1, one worker): every arc below is 0, yet it owns all.
            totals[self._points[0][1]] = KEY_SPACE
        for i, (point, worker_id) in enumerate(self._points):
            # Point i owns the arc (previous point, point]; for i == 0 the previous point is the
            # last one, one lap back, so the modulo gives the wrap-around arc.
            totals[worker_id] += (point - self._hashes[i - 1]) % KEY_SPACE
        return {w: arc / KEY_SPACE for w, arc in sorted(totals.items())}

    def _rebuild(self, points: list[tuple[int, str]]) -> None:
        self._points = sorted(points)
        self._hashes = [p for p, _ in self._points]
