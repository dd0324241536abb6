"""The handoff window: a log of ring changes, from which a key's earlier owners are computed lazily.
Pure: no I/O, no framework imports. Shared by the coordinator (which writes the log) and the
gateway (which replays the coordinator's entries), so both name the same previous owners.

No retired ring is materialised. The ring (hash_ring.HashRing) keeps the points of every worker
that was on it within the window, active or not; each log entry lists the workers it turned on or
off. A worker's state on the ring just before entry j is its state now, flipped once for each of
its toggles at or after j. The owner of a key on that ring is the first member clockwise from the
key that was active then. Memory: one entry per change (the toggled ids) and one toggle list per
worker; no ring copy, nothing in points per event.

A key's earlier owners are found in one walk down its nearest points: a cached bit table gives,
for each member, the kept entries whose previous ring had it active (a Python int, one bit an
entry: 32 bytes a member at MAX_ENTRIES, rebuilt when the log or the ring changes), OR-ed point by
point until every entry has its owner. The answer is the same for every key of a point, so it is
cached per point. The walk replaced an OR-accumulate over numpy blocks: a few points into a 2-worker
ring cost 266 µs that way on a cold CPU cache (the first request after an idle spell) and 36 µs as
this walk; at a thousand workers after a start from empty (250 entries, 175 points walked at the
median), 362 µs against 134 µs cold, 106 against 60 µs warm (README, "Routing tax").
"""

import asyncio
import bisect
import functools
import operator
import weakref
from collections import deque
from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

import numpy as np

from services.common.hash_ring import Forgotten, HashRing

# WorkerGenerateRequest.handoff_sources takes at most 16; the newest owners are the likeliest sources.
MAX_PREVIOUS = 16
MAX_ENTRIES = 256
# Points looked at clockwise from a key (about 900 members at a thousand workers): a ring in the
# window with so few active workers that none of them is that near the key (the first rings of a
# start from empty) names no owner for it.
MAX_POINTS_SCANNED = 1024
# Keys at the same point have the same earlier owners: each point's, once computed, is kept until
# the log or the ring changes (a few hundred µs per request saved on a cold CPU cache: README,
# "Routing tax"). Bounded: about 2 MB at the cap, emptied when it is reached.
MAX_CACHED_POINTS = 8192


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
        self._changes = 0  # grows with every append and drop (the owner masks' cache key)
        self._masks: OwnerMasks | None = None

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
        self._changes += 1
        for worker_id, _ in entry.toggles:
            self._toggles.setdefault(worker_id, []).append(entry.seq)

    def drop(self, before_at: float | None = None, before_seq: int | None = None) -> None:
        """Forgets entries older than `before_at`, before `before_seq`, or past max_entries. The
        workers no kept entry names any more become releasable (their points may go)."""
        while self.entries and (len(self.entries) > self.max_entries
                                or (before_at is not None and self.entries[0].at < before_at)
                                or (before_seq is not None and self.entries[0].seq < before_seq)):
            entry = self.entries.popleft()
            self._changes += 1
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

    def _owners_back(self, key: str, ring: HashRing) -> tuple[str, ...]:
        """The key's owners on the rings before the entries, each once, newest first (the same for
        every key of a point: cached per point with the masks)."""
        if not self.entries or not ring.num_points:
            return ()
        masks = self._owner_masks(ring)
        start = ring.slot(key)
        owners = masks.by_point.get(start)
        if owners is None:
            if len(masks.by_point) >= MAX_CACHED_POINTS:
                masks.by_point.clear()
            owners = masks.by_point[start] = self._scan_owners_back(start, ring, masks)
        return owners

    def _scan_owners_back(self, start: int, ring: HashRing, masks: "OwnerMasks") -> tuple[str, ...]:
        """The owners back of the keys of point `start`. The owner on the ring before entry i is
        the first of the nearest members (clockwise from the point) whose mask has bit i: one walk
        down the points, OR-ing the masks (Python ints: bit i = entry i), finds every entry's
        owner at once, and stops when each entry some member owned has its owner."""
        owners = ring.point_views().owners
        num_points = len(owners)
        claimed, found = 0, []  # found: (newest entry it claimed first, member number)
        for offset in range(min(num_points, MAX_POINTS_SCANNED)):  # at most one lap
            if claimed == masks.any_bits:  # also at once when no entry's ring had an owner
                break
            number = owners[(start + offset) % num_points]
            new = masks.rows[number] & ~claimed  # entries claimed first at this point
            if new:
                found.append((new.bit_length() - 1, number))
                claimed |= new
        return tuple(ring.name_of(number) for _, number in sorted(found, reverse=True))

    def _owner_masks(self, ring: HashRing) -> "OwnerMasks":
        """Per member number, the entries whose previous ring had it active; cached until the log
        or the ring changes: one int per member number, 32 bytes of bits at most."""
        cached = self._masks
        if cached is not None and cached.ring() is ring and \
                (cached.generation, cached.changes) == (ring.generation, self._changes):
            return cached
        first, count = self.entries[0].seq, len(self.entries)
        numbers, columns = [], []
        for worker_id, seqs in self._toggles.items():
            number = ring.number_of(worker_id)
            if number is not None:
                numbers += [number] * len(seqs)
                columns += [seq - first for seq in seqs]
        flips = np.zeros((ring.num_numbers, count), np.uint8)  # [members, entries]
        flips[numbers, columns] = 1
        # Active before entry i: active now, flipped once for each of its toggles at or after i.
        state = np.bitwise_xor.accumulate(flips[:, ::-1], axis=1)[:, ::-1] ^ ring.active_mask()[:, None]
        state &= np.array([e.num_active_before > 0 for e in self.entries], np.uint8)  # an empty ring owned nothing
        packed = np.packbits(state, axis=1, bitorder="little")  # bit i of the row: entry first + i
        rows = [int.from_bytes(row.tobytes(), "little") for row in packed]
        self._masks = OwnerMasks(weakref.ref(ring), ring.generation, self._changes, rows,
                                 functools.reduce(operator.or_, rows, 0), {})
        return self._masks


class OwnerMasks(NamedTuple):
    ring: "weakref.ref[HashRing]"
    generation: int
    changes: int
    rows: list[int]  # member number -> its entries (bit i: the ring before entry first + i had it active)
    any_bits: int    # the entries some member owned
    by_point: dict[int, tuple[str, ...]]  # point -> its keys' owners back (_owners_back)
