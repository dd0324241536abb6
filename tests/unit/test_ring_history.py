"""The change log names the same previous owners as the retired rings it replaced: a reference
implementation of that old code path (a full ring copied at each change, kept for the handoff
window) runs beside Membership on random histories, and every key's answers must agree."""

import random
from collections.abc import Collection, Iterable, Mapping

import numpy as np
import pytest

from services.common.hash_ring import HashRing, hash_key
from services.common import ring_history
from services.common.ring_history import MAX_POINTS_SCANNED, MAX_PREVIOUS, ChangeLog, Peer
from services.coordinator.membership import Membership

VNODES = 16
WINDOW_S = 60.0
KEYS = [f"conv-{i}" for i in range(300)]


def reference_previous_owners(key: str, retired_rings: Iterable[HashRing], addresses: Mapping[str, str],
                              skip: Collection[str]) -> tuple[Peer, ...]:
    """The previous_owners of services/coordinator/membership.py before the change log."""
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


class ReferenceHistory:
    """Materialised retired rings, as the coordinator kept them: at each ring change the ring as it
    was, unless it was empty, dropped once older than the window."""

    def __init__(self) -> None:
        self.rings: list[tuple[float, HashRing]] = []  # oldest first
        self.active: frozenset[str] = frozenset()

    def observe(self, active: Iterable[str], now: float) -> None:
        active = frozenset(active)
        if active != self.active and self.active:
            self.rings.append((now, HashRing.of(self.active, VNODES)))
        self.active = active
        self.rings = [(at, ring) for at, ring in self.rings if at >= now - WINDOW_S]

    def previous(self, key: str, addresses: Mapping[str, str], skip: Collection[str]) -> tuple[Peer, ...]:
        return reference_previous_owners(key, [r for _, r in reversed(self.rings)], addresses, skip)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def random_step(membership: Membership, rng: random.Random, worker_ids: list[str]) -> None:
    worker_id = rng.choice(worker_ids)
    roll = rng.random()
    if roll < 0.45:
        membership.register(worker_id, f"http://{worker_id}:{rng.randrange(2)}")
    elif roll < 0.6:
        membership.register(worker_id, f"http://{worker_id}:0", draining=True)
    elif roll < 0.8 and worker_id in membership:
        membership.drain(worker_id)
    elif worker_id in membership:
        membership.deregister(worker_id)


@pytest.mark.parametrize("seed", range(8))
def test_change_log_names_the_same_previous_owners_as_retired_rings(seed):
    rng = random.Random(seed)
    clock = Clock()
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=clock)
    reference = ReferenceHistory()
    worker_ids = [f"w{i}" for i in range(rng.randrange(3, 14))]
    checked = 0
    for _ in range(60):
        clock.now += rng.choice([0.0, 0.5, 3.0, 11.0, 25.0])
        for _ in range(rng.choice([1, 1, 2, 4])):  # several changes may fold into one ring change
            random_step(membership, rng, worker_ids)
        membership.commit()
        reference.observe(membership.ring.workers, clock.now)
        addresses = {w.worker_id: w.address for w in membership.workers()}
        for key in rng.sample(KEYS, 40):
            exclude = set(rng.sample(worker_ids, rng.choice([0, 0, 1, 2])))
            try:
                route = membership.route(key, exclude)
            except LookupError:
                assert not (set(reference.active) - exclude)
                continue
            assert route.worker_id == HashRing.of(reference.active, VNODES).owner(key, exclude)
            assert route.previous == reference.previous(key, addresses, exclude | {route.worker_id})
            checked += len(route.previous)
    assert checked > 0


def test_a_long_chain_of_owners_is_capped_and_newest_first():
    clock = Clock()
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=clock)
    reference = ReferenceHistory()
    for i in range(40):
        membership.register(f"w{i}", f"http://w{i}")
    membership.commit()
    reference.observe(membership.ring.workers, clock.now)
    drained = []
    for _ in range(MAX_PREVIOUS + 4):
        owner = membership.route("seq-7").worker_id
        membership.drain(owner)
        drained.append(owner)
        membership.commit()
        reference.observe(membership.ring.workers, clock.now)
    addresses = {w.worker_id: w.address for w in membership.workers()}
    route = membership.route("seq-7")
    assert [p.worker_id for p in route.previous] == drained[::-1][:MAX_PREVIOUS]
    assert route.previous == reference.previous("seq-7", addresses, {route.worker_id})


def first_point_at(ring: HashRing, key: str, worker_id: str) -> int:
    """How many points clockwise from the key the worker's first point is."""
    hashes, owners = ring.points
    start = int(hashes.searchsorted(np.uint32(hash_key(key))))
    clockwise = owners.take(np.arange(start, start + len(hashes)), mode="wrap")
    return int(np.flatnonzero(clockwise == ring.number_of(worker_id))[0])


def test_a_start_from_empty_names_every_owner_within_the_points_scanned():
    """One worker, then 299 five at a time, then a wave drains and rejoins: the first ring is so
    small that some keys' owners on it lie past MAX_POINTS_SCANNED; every owner nearer than that
    is named, in the retired rings' order."""
    clock = Clock()
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=clock)
    reference = ReferenceHistory()
    workers = [f"w{i:03d}" for i in range(300)]
    for start, end in zip([0, *range(1, 300, 5)], [*range(1, 300, 5), 300]):
        for worker_id in workers[start:end]:
            membership.register(worker_id, f"http://{worker_id}")
        membership.commit()
        reference.observe(membership.ring.workers, clock.now)
    for worker_id in workers[::10]:
        membership.drain(worker_id)
    membership.commit()
    reference.observe(membership.ring.workers, clock.now)
    for worker_id in workers[::10]:
        membership.register(worker_id, f"http://{worker_id}")
    membership.commit()
    reference.observe(membership.ring.workers, clock.now)
    ring = membership.ring
    assert ring.num_points > MAX_POINTS_SCANNED
    addresses = {w.worker_id: w.address for w in membership.workers()}
    cut = 0
    for key in KEYS:
        route = membership.route(key)
        retired = [r for _, r in reversed(reference.rings)]
        near = [r for r in retired if first_point_at(ring, key, r.owner(key)) < MAX_POINTS_SCANNED]
        assert route.previous == reference_previous_owners(key, near, addresses, {route.worker_id})
        cut += len(near) < len(retired)
    assert 0 < cut < len(KEYS)  # the bound was reached for some keys, not all


def test_memory_does_not_grow_with_the_number_of_changes():
    """Drains and rejoins of the same workers add log entries, never ring points."""
    clock = Clock()
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=clock)
    for i in range(20):
        membership.register(f"w{i}", f"http://w{i}")
    points = membership.ring.num_points
    for step in range(200):
        worker_id = f"w{step % 20}"
        membership.drain(worker_id)
        membership.commit()
        membership.register(worker_id, f"http://{worker_id}")
        membership.commit()
    assert membership.ring.num_points == points == 20 * VNODES
    assert membership.num_changes_kept == ChangeLog().max_entries


def test_the_window_releases_the_points_of_workers_that_left():
    clock = Clock()
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=clock)
    for worker_id in ("a", "b", "c"):
        membership.register(worker_id, f"http://{worker_id}")
    membership.commit()
    membership.deregister("b")
    membership.commit()
    assert membership.ring.members == ["a", "b", "c"] and membership.ring.workers == ["a", "c"]
    clock.now += WINDOW_S + 1
    membership.expire()
    assert membership.ring.members == ["a", "b", "c"] and membership.num_changes_kept == 0  # not yet
    ring = membership.committed_ring
    computed = ring.without(membership.log.releasable(ring))  # the sweep does this in a thread
    membership.register("d", "http://d")
    membership.commit(defer=False)  # the ring changed meanwhile: the computed points are stale
    assert not membership.log.forget_points(ring, computed) and ring.members == ["a", "b", "c", "d"]
    assert membership.log.forget_points(ring, ring.without(membership.log.releasable(ring)))
    assert ring.members == ["a", "c", "d"] and ring.num_points == 3 * VNODES
    assert {ring.owner(key) for key in KEYS} == {"a", "c", "d"}


def test_a_replayed_log_names_the_same_owners():
    """The gateway replays the coordinator's entries on its own ring: same answers."""
    rng = random.Random(3)
    clock = Clock()
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=clock)
    worker_ids = [f"w{i}" for i in range(10)]
    for _ in range(40):
        random_step(membership, rng, worker_ids)
        membership.commit()
    ring, log = HashRing(VNODES), ChangeLog()
    for entry in membership.log.entries:
        log.next_seq = entry.seq if not log.entries else log.next_seq
        log.append(entry)
        ring.update(on=[w for w, on in entry.toggles if on], off=[w for w, on in entry.toggles if not on])
    assert ring.workers == membership.ring.workers
    addresses = {w.worker_id: w.address for w in membership.workers()}
    for key in KEYS:
        owner = membership.ring.owner(key)
        assert log.previous_owners(key, ring, addresses, {owner}) == membership.route(key).previous


async def test_released_points_are_dropped_from_a_copy_made_off_the_loop():
    clock = Clock()
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=clock)
    for worker_id in ("a", "b", "c"):
        membership.register(worker_id, f"http://{worker_id}")
    membership.commit(defer=False)
    membership.deregister("b")
    clock.now += WINDOW_S + 1
    membership.expire()
    assert await membership.log.forget_points_off_loop(membership.committed_ring)
    assert membership.ring.members == ["a", "c"] and membership.ring.num_points == 2 * VNODES


def churned_membership(seed: int) -> Membership:
    rng = random.Random(seed)
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=Clock())
    worker_ids = [f"w{i}" for i in range(10)]
    for _ in range(30):
        random_step(membership, rng, worker_ids)
        membership.commit()
    return membership


def test_keys_of_one_point_share_one_scan_and_a_change_rescans():
    membership = churned_membership(5)
    ring, log = membership.ring, membership.log
    by_point: dict[int, list[str]] = {}
    for key in KEYS:
        by_point.setdefault(ring.slot(key), []).append(key)
    shared = next(keys for keys in by_point.values() if len(keys) > 1)
    first = log._owners_back(shared[0], ring)
    assert log._owners_back(shared[1], ring) is first  # the first key's scan, reused
    assert first == log._scan_owners_back(ring.slot(shared[0]), ring, log._owner_masks(ring))
    for key in KEYS:
        log._owners_back(key, ring)
    assert len(log._owner_masks(ring).by_point) == len(by_point)
    membership.register("w-new", "http://w-new")
    membership.commit()
    assert log._owners_back(shared[0], ring) == \
        log._scan_owners_back(ring.slot(shared[0]), ring, log._owner_masks(ring))
    assert len(log._owner_masks(ring).by_point) == 1  # nothing cached before the change survives it


def test_the_per_point_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ring_history, "MAX_CACHED_POINTS", 4)
    membership = churned_membership(6)
    ring, log = membership.ring, membership.log
    for key in KEYS:
        owners_back = log._owners_back(key, ring)
        assert len(log._owner_masks(ring).by_point) <= 4
        assert owners_back == log._scan_owners_back(ring.slot(key), ring, log._owner_masks(ring))


def test_a_window_whose_rings_had_no_owner_names_none_without_walking_the_ring(monkeypatch):
    membership = Membership(ttl_s=1e9, vnodes=VNODES, handoff_window_s=WINDOW_S, clock=Clock())
    membership.register("a", "http://a")
    membership.commit()  # the only change: from an empty ring, which owned nothing
    ring, log = membership.ring, membership.log
    assert len(log.entries) == 1
    read = []
    views = ring.point_views()
    monkeypatch.setattr(ring, "point_views", lambda: views._replace(owners=Recording(views.owners, read)))
    assert all(log._owners_back(key, ring) == () for key in KEYS)
    assert read == []


class Recording:
    """A sequence that records the indices read."""

    def __init__(self, items, read: list[int]) -> None:
        self.items, self.read = items, read

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> int:
        self.read.append(i)
        return self.items[i]
