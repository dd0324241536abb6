import pytest

from services.coordinator.endpoint_slices import Endpoint
from services.coordinator.kubernetes_membership import KubernetesMembership
from services.coordinator.membership import UnknownWorker
from tests.endpoint_slice_docs import dns_address
from tests.unit.test_membership import FakeClock, changes, clock  # noqa: F401 (the same fixtures)

TTL_S = 10


@pytest.fixture
def membership(clock, changes) -> KubernetesMembership:
    return KubernetesMembership(ttl_s=TTL_S, vnodes=20, clock=clock, on_change=lambda *event: changes.append(event))


def listed(**states: str) -> dict[str, Endpoint]:
    return {w: Endpoint(dns_address(w), state) for w, state in states.items()}


def register(membership, worker_id: str, **kwargs):
    return membership.register(worker_id, dns_address(worker_id), "gpt2",
                               served_model_names=["gpt2", "chat"], max_model_len=1024, **kwargs)


def test_one_list_puts_every_ready_worker_on_the_ring_without_registrations(membership):
    membership.sync(listed(**{"worker-0": "active", "worker-1": "active", "worker-2": "draining"}))
    assert membership.ring.workers == ["worker-0", "worker-1"]
    assert membership.route("seq-1").address == dns_address(membership.route("seq-1").worker_id)
    assert membership.num_draining == 1


def test_a_listed_worker_that_never_registered_is_told_to_register_and_brings_its_model(membership, changes, clock):
    membership.sync(listed(**{"worker-0": "active"}))
    with pytest.raises(UnknownWorker):
        membership.heartbeat("worker-0", load=1)
    clock.advance(2)
    assert register(membership, "worker-0").last_heartbeat == clock.now
    info = membership.get("worker-0")
    assert (info.model_name, info.served_model_names, info.max_model_len) == ("gpt2", ("gpt2", "chat"), 1024)
    assert [c[0] for c in changes] == ["join", "update"]  # the ring did not move
    assert membership.heartbeat("worker-0", load=3).load == 3


def test_a_registered_worker_kubernetes_does_not_list_waits_off_the_ring(membership):
    register(membership, "worker-0")
    membership.heartbeat("worker-0", load=2)  # accepted: no 404, no re-registration loop
    assert len(membership) == 0 and membership.ring.workers == []
    membership.sync(listed(**{"worker-0": "active"}))
    assert membership.ring.workers == ["worker-0"]
    assert membership.get("worker-0").served_model_names == ("gpt2", "chat")


def test_kubernetes_address_is_routed_to_not_the_registered_one(membership):
    membership.sync({"worker-0": Endpoint("http://10.8.1.12:8082", "active")})
    membership.register("worker-0", "http://somewhere-else:9999", "gpt2")
    assert membership.route("seq-1").address == "http://10.8.1.12:8082"


def test_ttl_never_drops_a_worker_kubernetes_lists(membership, clock):
    membership.sync(listed(**{"worker-0": "active"}))
    register(membership, "worker-0")
    clock.advance(100 * TTL_S)
    assert membership.expire() == []
    assert membership.ring.workers == ["worker-0"]
    membership.heartbeat("worker-0")  # its registration is kept while it is listed


def test_an_unlisted_registration_is_forgotten_after_a_ttl_of_silence(membership, clock):
    register(membership, "worker-0")
    clock.advance(TTL_S + 1)
    membership.expire()
    with pytest.raises(UnknownWorker):
        membership.heartbeat("worker-0")


def test_terminating_drains_then_gone_leaves_and_the_drained_owner_stays_a_handoff_source(membership, changes):
    membership.sync(listed(**{"worker-0": "active", "worker-1": "active"}))
    owner = membership.route("seq-7").worker_id
    other = "worker-1" if owner == "worker-0" else "worker-0"
    membership.sync(listed(**{owner: "draining", other: "active"}))
    route = membership.route("seq-7")
    assert route.worker_id == other and [p.worker_id for p in route.previous] == [owner]
    membership.sync(listed(**{other: "active"}))
    assert owner not in membership and membership.route("seq-7").previous == ()
    assert [c[:2] for c in changes[-2:]] == [("drain", owner), ("leave", owner)]


def test_losing_readiness_leaves_and_regaining_it_rejoins_without_registering_again(membership):
    membership.sync(listed(**{"worker-0": "active"}))
    register(membership, "worker-0")
    membership.sync({})
    assert "worker-0" not in membership
    membership.sync(listed(**{"worker-0": "active"}))
    assert membership.get("worker-0").model_name == "gpt2"
    membership.heartbeat("worker-0")


def test_a_drain_the_worker_asks_for_holds_until_its_pod_is_gone(membership):
    membership.sync(listed(**{"worker-0": "active", "worker-1": "active"}))
    register(membership, "worker-0")
    membership.drain("worker-0")  # preStop, a moment before the slice says terminating
    assert membership.ring.workers == ["worker-1"]
    membership.sync(listed(**{"worker-0": "active", "worker-1": "active"}))  # an unrelated update
    membership.sync(listed(**{"worker-0": "draining", "worker-1": "active"}))
    assert membership.get("worker-0").state == "draining"
    membership.sync(listed(**{"worker-1": "active"}))  # the pod is gone; a new one takes its name
    membership.sync(listed(**{"worker-0": "active", "worker-1": "active"}))
    assert membership.ring.workers == ["worker-0", "worker-1"]


def test_deregistered_worker_stays_out_while_its_pod_is_still_listed(membership):
    membership.sync(listed(**{"worker-0": "draining", "worker-1": "active"}))
    register(membership, "worker-0", draining=True)
    assert membership.deregister("worker-0")
    assert "worker-0" not in membership
    membership.sync({"worker-0": Endpoint("http://10.8.1.12:8082", "draining"), **listed(**{"worker-1": "active"})})
    assert "worker-0" not in membership
    assert not membership.deregister("worker-0")  # a retried shutdown call
    membership.sync(listed(**{"worker-1": "active"}))
    membership.sync(listed(**{"worker-0": "active", "worker-1": "active"}))  # its replacement
    assert "worker-0" in membership.ring


def test_drain_of_an_unknown_worker_raises(membership):
    with pytest.raises(UnknownWorker):
        membership.drain("worker-9")


def test_settling_until_the_first_list_and_until_listed_workers_registered(membership, clock):
    assert membership.settling(uptime_s=100)
    membership.sync(listed(**{"worker-0": "active", "worker-1": "active"}))
    register(membership, "worker-0")
    assert membership.settling(uptime_s=1)
    assert not membership.settling(uptime_s=TTL_S)  # a worker that cannot register does not hold it
    register(membership, "worker-1")
    assert not membership.settling(uptime_s=1)
