import pytest

from services.coordinator.membership import Membership, NoWorkers, UnknownWorker


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
    assert membership.route("seq-1") == ("w1", "http://new:8000", 2)
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
