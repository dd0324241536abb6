"""The handoff window: a log of ring changes, from which a key's earlier owners are computed lazily.
Pure: no I/O, no framework imports. Shared by the coordinator (which writes the log) and the
gateway (which replays the coordinator's entries), so both name the same previous owners.

No retired ring is materialised. The ring (hash_ring.HashRing) keeps the points of every worker
that was on it within the window, active or not; each log entry lists the workers it turned on or
off. A worker's state on the ring just before entry j is its state now, flipped once for each of
its toggles at or after j. The owner of a key on that ring is the first member clockwise from the
key that was active then. Memory: one entry per change (the toggled ids) and one toggle list per
worker; nothing grows with the product of workers and events.
"""

import asyncio
import bisect
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from services.common.hash_ring import Forgotten, HashRing

# WorkerGenerateRequest.handoff_sources takes at most 16; the newest owners are the likeliest sources.
MAX_PREVIOUS = 16
MAX_ENTRIES = 256
# Members looked at per past ring: a ring in the window with so few active workers that none of
# a key's 256 nearest members was one of them (a start-up from empty) names no owner for it.
MAX_MEMBERS_SCANNED = 256


class Peer(NamedTuple):
    worker_id: str
    address: str


class Entry(NamedTuple):
    seq: int
    at: float  # when the ring before it retired
    toggles: tuple[tuple[str, bool], ...]  # (worker id, active after the change)
    num_active_before: int


class ChangeLog:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.entries: deque[Entry] = deque()   # oldest first, seqs consecutive
        self.next_seq = 1
        self._toggles: dict[str, list[int]] = {}  # worker -> seqs of its entries, ascending
        self._released: set[str] = set()  # no kept entry names them: their points may go

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def first_seq(self) -> int:
        """The oldest entry kept (next_seq when none is)."""
        return self.entries[0].seq if self.entries else self.next_seq

    def record(self, at: float, on: Collection[str], off: Collection[str], num_active_after: int) -> Entry | None:
        """Logs a ring change (the workers that changed state). None when nothing changed."""
        if not on and not off:
            return None
        toggles = tuple([(w, True) for w in sorted(on)] + [(w, False) for w in sorted(off)])
        entry = Entry(self.next_seq, at, toggles, num_active_after - len(on) + len(off))
        self.append(entry)
        return entry

    def append(self, entry: Entry) -> None:
        """Takes an entry (the gateway replays the coordinator's, in order)."""
        if entry.seq != self.next_seq:
            raise ValueError(f"ring change {entry.seq} out of order: expected {self.next_seq}")
        self.entries.append(entry)
        self.next_seq = entry.seq + 1
        for worker_id, _ in entry.toggles:
            self._toggles.setdefault(worker_id, []).append(entry.seq)

    def drop(self, before_at: float | None = None, before_seq: int | None = None) -> None:
        """Forgets entries older than `before_at`, before `before_seq`, or past max_entries. The
        workers no kept entry names any more become releasable (their points may go)."""
        while self.entries and (len(self.entries) > self.max_entries
                                or (before_at is not None and self.entries[0].at < before_at)
                                or (before_seq is not None and self.entries[0].seq < before_seq)):
            entry = self.entries.popleft()
            for worker_id, _ in entry.toggles:
                seqs = self._toggles[worker_id]
                del seqs[:bisect.bisect_right(seqs, entry.seq)]
                if not seqs:
                    del self._toggles[worker_id]
                    self._released.add(worker_id)
        if before_seq is not None and not self.entries:
            self.next_seq = max(self.next_seq, before_seq)

    def named(self, worker_id: str) -> bool:
        return worker_id in self._toggles

    def releasable(self, ring: HashRing) -> list[str]:
        """Workers whose points the ring can drop: out of the log and off the ring (sorted). Those
        back on it or named again are no longer candidates (a later drop names them again)."""
        self._released = {w for w in self._released
                          if w not in self._toggles and w not in ring and ring.is_member(w)}
        return sorted(self._released)

    def forget_points(self, ring: HashRing, computed: Forgotten | None = None) -> bool:
        """Drops the releasable workers' points from `ring`; `computed`: ring.without(them), taken
        off the event loop (an O(points) pass: 0.1 s at a thousand workers)."""
        released = self.releasable(ring)
        if released and ring.forget(released, computed):
            self._released.clear()
            return True
        return not released

    async def forget_points_off_loop(self, ring: HashRing) -> bool:
        """forget_points() with the O(points) copy made in a thread (the coordinator's sweep, the
        gateway's ring sync); the ring must change only on the calling loop."""
        released = self.releasable(ring)
        return not released or self.forget_points(ring, await asyncio.to_thread(ring.without, released))

    def previous_owners(self, key: str, ring: HashRing, addresses: Mapping[str, str],
                        skip: Collection[str]) -> tuple[Peer, ...]:
        """The key's owners on the rings of the window (the ring before each entry, newest first)
        that are still registered (have an address), each once, not in `skip`, at most
        MAX_PREVIOUS: where its KV may still be."""
        seen, previous = set(skip), []
        for worker_id in self._owners_back(key, ring):
            if worker_id in seen or worker_id not in addresses:
                continue
            seen.add(worker_id)
            previous.append(Peer(worker_id, addresses[worker_id]))
            if len(previous) == MAX_PREVIOUS:
                break
        return tuple(previous)

    def _owners_back(self, key: str, ring: HashRing) -> Iterable[str]:
        """The key's owner on the ring before each entry, newest first, yielded where it changes:
        it can only change at an entry that toggles one of the members nearer than the owner."""
        if not self.entries:
            return
        first = self.entries[0].seq
        members = ring.walk_members(key)
        prefix: list[tuple[str, list[int], bool]] = []  # nearest members: id, toggles, active now
        j = self.entries[-1].seq
        while j >= first:
            if self.entries[j - first].num_active_before == 0:
                j -= 1  # an empty ring owned nothing
                continue
            scanned = self._scan(prefix, members, j)
            if scanned and self._active_before(prefix[scanned - 1], j):
                yield prefix[scanned - 1][0]
            earlier = [seqs[i - 1] for _, seqs, _ in prefix[:scanned]
                       if (i := bisect.bisect_left(seqs, j)) > 0]
            j = max(earlier, default=first - 1)

    def _scan(self, prefix: list, members, j: int) -> int:
        """How many of the nearest members to look at for the ring before entry j: up to and
        including its owner (extending `prefix` from the ring walk as needed)."""
        for k in range(MAX_MEMBERS_SCANNED):
            if k == len(prefix):
                member = next(members, None)
                if member is None:
                    return k
                prefix.append((member[0], self._toggles.get(member[0], []), member[1]))
            if self._active_before(prefix[k], j):
                return k + 1
        return MAX_MEMBERS_SCANNED

    @staticmethod
    def _active_before(member: tuple[str, list[int], bool], j: int) -> bool:
        _, seqs, active_now = member
        flips = len(seqs) - bisect.bisect_left(seqs, j)
        return active_now != (flips % 2 == 1)
