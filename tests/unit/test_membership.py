import pytest

from services.common.ring_history import MAX_ENTRIES
from services.coordinator.membership import (MAX_PREVIOUS, Membership, NoWorkers,
                                            UnknownWorker)
from services.common.hash_ring import HashRing


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list:
    return []


@pytest.fixture
def membership(clock, changes) -> Membership:
    return Membership(ttl_s=10, vnodes=20, clock=clock,
                      on_change=lambda *event: changes.append(event))


def test_register_adds_worker_to_ring_and_bumps_epoch(membership, changes):
    info = membership.register("w1", "http://w1:8000", "gpt2")
    assert (info.worker_id, info.address, info.model_name) == ("w1", "http://w1:8000", "gpt2")
    assert info.registered_at == info.last_heartbeat == 1000.0
    assert membership.epoch == 1
    assert "w1" in membership and len(membership) == 1
    assert membership.ring.workers == ["w1"] and len(membership.ring) == 20
    assert changes == [("join", "w1", 1)]


def test_register_is_idempotent(membership, clock):
    membership.register("w1", "http://w1:8000")
    clock.advance(3)
    info = membership.register("w1", "http://w1:8000")
    assert membership.epoch == 1
    assert info.registered_at == 1000.0 and info.last_heartbeat == 1003.0
    assert len(membership.ring) == 20


def test_reregister_with_new_address_updates_route_and_epoch(membership, changes):
    membership.register("w1", "http://old:8000")
    membership.register("w1", "http://new:8000")
    assert membership.route("seq-1") == ("w1", "http://new:8000", 2, ())
    assert changes[-1] == ("update", "w1", 2)


def test_heartbeat_refreshes_without_bumping_epoch(membership, clock):
    membership.register("w1", "http://w1:8000")
    clock.advance(8)
    membership.heartbeat("w1")
    assert membership.get("w1").last_heartbeat == 1008.0
    assert membership.epoch == 1
    clock.advance(8)  # 16 s since register, 8 since the heartbeat
    assert membership.expire() == []
    assert "w1" in membership


def test_unknown_heartbeat_raises(membership):
    with pytest.raises(UnknownWorker):
        membership.heartbeat("ghost")


def test_expire_removes_silent_workers_only(membership, clock, changes):
    membership.register("w1", "http://w1:8000")
    membership.register("w2", "http://w2:8000")
    clock.advance(6)
    membership.heartbeat("w2")
    clock.advance(5)  # w1 silent 11 s > ttl 10; w2 silent 5 s
    assert membership.expire() == ["w1"]
    assert [w.worker_id for w in membership.workers()] == ["w2"]
    assert membership.ring.workers == ["w2"]
    assert membership.epoch == 3
    assert changes[-1] == ("expire", "w1", 3)
    assert membership.expire() == []
    assert membership.epoch == 3


def test_worker_is_kept_at_exactly_ttl(membership, clock):
    membership.register("w1", "http://w1:8000")
    clock.advance(10)
    assert membership.expire() == []


def test_reregister_after_expiry(membership, clock):
    membership.register("w1", "http://w1:8000")
    clock.advance(11)
    membership.expire()
    with pytest.raises(UnknownWorker):
        membership.heartbeat("w1")
    info = membership.register("w1", "http://w1:8000")
    assert info.registered_at == 1011.0
    assert membership.epoch == 3
    assert membership.route("seq-1").worker_id == "w1"


def test_deregister(membership, changes):
    membership.register("w1", "http://w1:8000")
    assert membership.deregister("w1") is True
    assert membership.epoch == 2 and len(membership) == 0 and len(membership.ring) == 0
    assert changes[-1] == ("leave", "w1", 2)
    assert membership.deregister("w1") is False
    assert membership.epoch == 2


def test_route_is_stable_and_follows_the_ring(membership):
    for i in range(3):
        membership.register(f"w{i}", f"http://w{i}:8000")
    route = membership.route("seq-7")
    assert route.worker_id == membership.ring.owner("seq-7")
    assert route.address == f"http://{route.worker_id}:8000"
    assert route.epoch == 3
    assert all(membership.route("seq-7") == route for _ in range(10))


def test_route_without_workers_raises(membership):
    with pytest.raises(NoWorkers):
        membership.route("seq-1")


def test_workers_are_listed_in_id_order(membership):
    for worker_id in ("c", "a", "b"):
        membership.register(worker_id, f"http://{worker_id}:8000")
    assert [w.worker_id for w in membership.workers()] == ["a", "b", "c"]


SEQ_IDS = [f"seq-{i}" for i in range(2000)]


def register_all(membership: Membership, worker_ids, one_by_one: bool = False) -> None:
    """Joins read as one ring change, or `one_by_one`, each ring read (routed by) before the next:
    changes nobody read in between fold into one, and the handoff window lists rings that routed."""
    for worker_id in worker_ids:
        membership.register(worker_id, f"http://{worker_id}:8000")
        if one_by_one:
            membership.commit()
    membership.commit()


def state_of(membership: Membership) -> dict[str, str]:
    return {w.worker_id: w.state for w in membership.workers()}


def test_drain_takes_worker_off_the_ring_but_keeps_it_listed(membership, changes):
    register_all(membership, ["w1", "w2"])
    info = membership.drain("w1")
    assert info.state == "draining"
    assert membership.ring.workers == ["w2"] and "w1" in membership and len(membership) == 2
    assert state_of(membership) == {"w1": "draining", "w2": "active"}
    assert (membership.num_active, membership.num_draining) == (1, 1)
    assert membership.epoch == 3 and changes[-1] == ("drain", "w1", 3)
    assert {membership.route(s).worker_id for s in SEQ_IDS[:200]} == {"w2"}
    membership.drain("w1")  # idempotent
    assert membership.epoch == 3 and len(changes) == 3


def test_drain_unknown_worker_raises(membership):
    with pytest.raises(UnknownWorker):
        membership.drain("ghost")


def test_draining_worker_lives_on_heartbeats_and_expires_without_them(membership, clock):
    register_all(membership, ["w1", "w2"])
    membership.drain("w1")
    for _ in range(3):
        clock.advance(8)
        membership.heartbeat("w1")
        membership.heartbeat("w2")
        assert membership.expire() == []
    assert state_of(membership) == {"w1": "draining", "w2": "active"}
    assert membership.ring.workers == ["w2"]
    clock.advance(11)
    membership.heartbeat("w2")
    assert membership.expire() == ["w1"]
    assert "w1" not in membership and membership.num_draining == 0


def test_deregister_removes_a_draining_worker(membership, changes):
    register_all(membership, ["w1", "w2"])
    membership.drain("w1")
    ring_points = len(membership.ring)
    assert membership.deregister("w1") is True
    assert "w1" not in membership and len(membership.ring) == ring_points
    assert changes[-1] == ("leave", "w1", 4)


def test_draining_the_last_active_worker_leaves_nothing_to_route_to(membership):
    register_all(membership, ["w1"])
    membership.drain("w1")
    with pytest.raises(NoWorkers):
        membership.route("seq-1")


def test_register_draining_stays_off_the_ring(membership, changes, clock):
    register_all(membership, ["w2"])
    info = membership.register("w1", "http://w1:8000", draining=True)
    assert info.state == "draining" and membership.ring.workers == ["w2"]
    assert changes[-1] == ("drain", "w1", 2)
    clock.advance(3)
    again = membership.register("w1", "http://w1:8000", draining=True)
    assert again.state == "draining" and again.last_heartbeat == 1003.0
    assert membership.ring.workers == ["w2"] and membership.epoch == 2


def test_register_draining_drains_an_active_worker(membership, changes):
    register_all(membership, ["w1", "w2"])
    membership.register("w1", "http://w1:8000", draining=True)
    assert state_of(membership)["w1"] == "draining" and membership.ring.workers == ["w2"]
    assert changes[-1] == ("drain", "w1", 3)


def test_reregister_active_rejoins_the_ring(membership, changes):
    register_all(membership, ["w1", "w2"])
    membership.drain("w1")
    info = membership.register("w1", "http://w1-new:8000")
    assert info.state == "active" and info.address == "http://w1-new:8000"
    assert membership.ring.workers == ["w1", "w2"]
    assert changes[-1] == ("join", "w1", 4)


def test_route_excludes_workers_like_removing_them(membership):
    register_all(membership, ["w0", "w1", "w2"])
    for seq_id in SEQ_IDS[:300]:
        route = membership.route(seq_id, exclude=["w1"])
        assert route.worker_id == membership.ring.owner(seq_id, exclude=["w1"]) != "w1"
        assert route.address == f"http://{route.worker_id}:8000"
    with pytest.raises(NoWorkers):
        membership.route("seq-1", exclude=["w0", "w1", "w2"])


def test_previous_lists_the_old_owner_after_scale_out(clock):
    membership = Membership(ttl_s=10_000, vnodes=20, handoff_window_s=60, clock=clock)
    register_all(membership, ["w0", "w1", "w2"])
    clock.advance(61)  # the rings of the first joins are out of the window
    before = {s: membership.route(s).worker_id for s in SEQ_IDS}
    register_all(membership, ["w3"])
    moved = 0
    for seq_id in SEQ_IDS:
        route = membership.route(seq_id)
        if route.worker_id == before[seq_id]:
            assert route.previous == ()
        else:
            moved += 1
            assert route.worker_id == "w3"
            assert route.previous == ((before[seq_id], f"http://{before[seq_id]}:8000"),)
    assert moved > 0


def test_previous_lists_the_drained_owner(membership):
    register_all(membership, ["w0", "w1", "w2"])
    old = membership.route("seq-7").worker_id
    membership.drain(old)
    route = membership.route("seq-7")
    assert route.worker_id != old
    assert route.previous == ((old, f"http://{old}:8000"),)


def key_owned_in_turn(worker_ids: list[str]) -> str:
    """A key owned by worker_ids[i] once the first i+1 of them have joined."""
    rings = [HashRing(20) for _ in worker_ids]
    for i, ring in enumerate(rings):
        for worker_id in worker_ids[:i + 1]:
            ring.add(worker_id)
    return next(s for s in SEQ_IDS if [r.owner(s) for r in rings] == worker_ids)


def test_previous_is_newest_first_deduplicated_and_registered_only(membership):
    seq_id = key_owned_in_turn(["w0", "w1", "w2"])
    register_all(membership, ["w0", "w1", "w2"], one_by_one=True)
    membership.drain("w2")
    membership.commit()
    membership.register("w2", "http://w2:8000")  # rings kept: {w0}, {w0,w1}, {w0..w2}, {w0,w1}
    route = membership.route(seq_id)
    assert route.worker_id == "w2"
    assert [p.worker_id for p in route.previous] == ["w1", "w0"]
    membership.deregister("w1")
    route = membership.route(seq_id)
    assert route.worker_id == "w2" and [p.worker_id for p in route.previous] == ["w0"]


def test_previous_never_lists_excluded_workers(membership):
    seq_id = key_owned_in_turn(["w0", "w1", "w2"])
    register_all(membership, ["w0", "w1", "w2"], one_by_one=True)
    assert [p.worker_id for p in membership.route(seq_id, exclude=["w1"]).previous] == ["w0"]
    # The current owner is excluded (unreachable) though registered: route elsewhere, never list it.
    route = membership.route(seq_id, exclude=["w2"])
    assert route.worker_id == "w1" and [p.worker_id for p in route.previous] == ["w0"]
    route = membership.route(seq_id, exclude=["w2", "w0"])
    assert route.worker_id == "w1" and route.previous == ()


def test_previous_carries_current_addresses(membership):
    register_all(membership, ["w0", "w1", "w2"])
    old = membership.route("seq-7").worker_id
    membership.drain(old)
    membership.register(old, "http://moved:9000", draining=True)
    assert membership.route("seq-7").previous == ((old, "http://moved:9000"),)


def test_previous_ends_with_the_handoff_window(clock):
    membership = Membership(ttl_s=10_000, vnodes=20, handoff_window_s=60, clock=clock)
    register_all(membership, ["w0", "w1", "w2"])
    old = membership.route("seq-7").worker_id
    membership.drain(old)
    clock.advance(60)
    assert [p.worker_id for p in membership.route("seq-7").previous] == [old]
    clock.advance(0.5)
    assert membership.route("seq-7").previous == ()
    assert membership.num_changes_kept == 0


def test_expire_forgets_old_rings(clock):
    membership = Membership(ttl_s=10_000, vnodes=20, handoff_window_s=60, clock=clock)
    register_all(membership, ["w0", "w1"])
    assert membership.num_changes_kept == 1
    clock.advance(61)
    membership.expire()
    assert membership.num_changes_kept == 0


def test_previous_lists_a_chain_of_drained_owners_newest_first_capped(clock):
    membership = Membership(ttl_s=10_000, vnodes=20, clock=clock)
    register_all(membership, [f"w{i:02}" for i in range(20)])
    drained = []
    for _ in range(MAX_PREVIOUS + 2):
        owner = membership.route("seq-7").worker_id
        membership.drain(owner)
        drained.append(owner)
    route = membership.route("seq-7")
    assert route.worker_id not in drained
    assert [p.worker_id for p in route.previous] == drained[::-1][:MAX_PREVIOUS]


def test_ring_history_is_bounded(clock):
    membership = Membership(ttl_s=10_000, vnodes=5, clock=clock)
    register_all(membership, ["w0"])
    for i in range(MAX_ENTRIES + 20):
        register_all(membership, [f"x{i}"], one_by_one=True)
    assert membership.num_changes_kept == MAX_ENTRIES
