"""The gateway's own routing: its RingView agrees with the coordinator's Membership, and bounded
loads keep every worker within factor x average + 1."""

import random

import pytest

from services.common.schemas import RingState, RingWorker
from services.coordinator.membership import Membership
from services.common.hash_ring import EmptyRingError
from services.gateway.placement import LoadEstimates, Placer, bounded_choice
from services.gateway.ring_view import RingView

VNODES = 64


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def view_of(membership: Membership) -> RingView:
    return RingView.of(RingState.model_validate(membership.state() | {"instance": "test"}))


def test_the_gateways_view_routes_like_the_coordinator_through_joins_drains_and_leaves():
    clock = Clock()
    membership = Membership(ttl_s=60, vnodes=VNODES, clock=clock)
    rng = random.Random(7)
    for step in range(12):
        clock.now += 1
        workers = [w.worker_id for w in membership.workers()]
        if len(workers) < 2 or rng.random() < 0.5:
            membership.register(f"w{step}", f"http://w{step}:1")
        elif rng.random() < 0.5:
            membership.drain(rng.choice(workers))
        else:
            membership.deregister(rng.choice(workers))
        view = view_of(membership)
        for i in range(200):
            key = f"conv-{i}"
            try:
                expected = membership.route(key)
            except LookupError:
                with pytest.raises(EmptyRingError):
                    view.owner(key)
                continue
            route = view.route(key, view.owner(key))
            assert route.worker_id == expected.worker_id and route.address == expected.address
            assert [(p.worker_id, p.address) for p in route.previous] == list(expected.previous)
            assert route.epoch == membership.epoch


def test_candidates_start_at_the_owner_and_list_every_active_worker_once():
    membership = Membership(ttl_s=60, vnodes=VNODES)
    for w in ("a", "b", "c", "d"):
        membership.register(w, f"http://{w}")
    membership.drain("d")
    view = view_of(membership)
    for i in range(50):
        candidates = list(view.candidates(f"k{i}"))
        assert candidates[0] == membership.route(f"k{i}").worker_id
        assert sorted(candidates) == ["a", "b", "c"]
        assert list(view.candidates(f"k{i}", exclude={candidates[0]})) == candidates[1:]


def test_load_estimate_is_the_report_plus_this_gateways_change_since():
    loads = LoadEstimates()
    worker = RingWorker(worker_id="a", address="http://a", state="active", age_s=1, last_heartbeat_age_s=0,
                        load=0, load_reports=0)
    loads.observe([worker])
    for _ in range(3):
        loads.started("a")
    assert loads.load("a") == 3
    # The worker reports 5 (3 of ours, 2 from another gateway) while ours are still open.
    loads.observe([worker.model_copy(update={"load": 5, "load_reports": 1})])
    assert loads.load("a") == 5
    loads.finished("a")
    loads.started("a")
    loads.started("a")
    assert loads.load("a") == 6
    for _ in range(4):
        loads.finished("a")
    assert loads.load("a") == 2  # the other gateway's two, until the next report says otherwise
    loads.observe([worker.model_copy(update={"load": 0, "load_reports": 2})])
    assert loads.load("a") == 0
    # A report taken while two of ours were still in transit (not yet counted by the worker)
    # does not hide them.
    loads.started("a")
    loads.started("a")
    loads.observe([worker.model_copy(update={"load": 0, "load_reports": 3})])
    assert loads.load("a") == 2


def test_bounded_choice_takes_the_first_worker_under_the_bound():
    assert bounded_choice(["a", "b", "c"], {"a": 0, "b": 0, "c": 0}, 1.25) == "a"
    # bound = 1.25 * (6 + 1) / 3 = 2.92: a (4) is over, b (2) is under
    assert bounded_choice(["a", "b", "c"], {"a": 4, "b": 2, "c": 0}, 1.25) == "b"
    # bound = 1.25 * (8 + 1) / 3 = 3.75
    assert bounded_choice(["a", "b", "c"], {"a": 4, "b": 4, "c": 0}, 1.25) == "c"


@pytest.mark.parametrize("factor", [1.0, 1.25, 2.0])
def test_skewed_keys_never_push_a_worker_over_factor_times_average_plus_one(factor):
    """Every key hashes near one worker; loads rise as requests are placed and fall as random ones
    finish: at every placement the chosen worker is within the bound, and keys spill."""
    membership = Membership(ttl_s=60, vnodes=VNODES)
    for w in ("a", "b", "c"):
        membership.register(w, f"http://{w}")
    view = view_of(membership)
    keys = [k for k in (f"s-{i}" for i in range(3000)) if view.owner(k) == "a"][:200]
    placer = Placer("affinity", factor)
    rng = random.Random(1)
    open_at: list[str] = []
    decisions = []
    for step in range(2000):
        if open_at and rng.random() < 0.45:
            placer.loads.finished(open_at.pop(rng.randrange(len(open_at))))
            continue
        placement = placer.place(view, keys[step % len(keys)])
        worker_id = placement.route.worker_id
        placer.loads.started(worker_id)
        open_at.append(worker_id)
        decisions.append(placement.decision)
        loads = [placer.loads.load(w) for w in ("a", "b", "c")]
        assert loads[("a", "b", "c").index(worker_id)] <= factor * sum(loads) / 3 + 1
    assert decisions.count("spilled") > 0 and decisions.count("owner") > 0


def test_a_spilled_key_lists_its_owner_first_and_its_next_turn_lists_where_it_ran():
    membership = Membership(ttl_s=60, vnodes=VNODES)
    for w in ("a", "b"):
        membership.register(w, f"http://{w}")
    view = view_of(membership)
    key = next(k for k in (f"s-{i}" for i in range(100)) if view.owner(k) == "a")
    placer = Placer("affinity", 1.0)
    for _ in range(3):
        placer.loads.started("a")
    spilled = placer.place(view, key)
    assert (spilled.decision, spilled.route.worker_id) == ("spilled", "b")
    assert [p.worker_id for p in spilled.route.previous] == ["a"]
    for _ in range(3):
        placer.loads.finished("a")
    back = placer.place(view, key)
    assert (back.decision, back.route.worker_id) == ("owner", "a")
    assert [p.worker_id for p in back.route.previous] == ["b"]  # the spilled turn's KV is there


def test_round_robin_takes_each_active_worker_in_turn():
    membership = Membership(ttl_s=60, vnodes=VNODES)
    for w in ("a", "b", "c"):
        membership.register(w, f"http://{w}")
    placer = Placer("round_robin")
    view = view_of(membership)
    chosen = [placer.place(view, "one-key").route.worker_id for _ in range(6)]
    assert sorted(chosen[:3]) == ["a", "b", "c"] and chosen[:3] == chosen[3:]


def test_a_view_kept_by_deltas_routes_like_the_coordinator_and_like_a_fresh_view():
    clock = Clock()
    membership = Membership(ttl_s=60, vnodes=VNODES, handoff_window_s=30, clock=clock)
    rng = random.Random(11)
    membership.register("w0", "http://w0:1")
    view = view_of(membership)
    loads = LoadEstimates()
    for step in range(40):
        clock.now += rng.choice([0.5, 4.0, 9.0])
        for _ in range(rng.choice([1, 3])):
            workers = [w.worker_id for w in membership.workers()]
            roll = rng.random()
            if len(workers) < 3 or roll < 0.4:
                membership.register(f"w{rng.randrange(12)}", f"http://w{step}:1")
            elif roll < 0.7:
                membership.drain(rng.choice(workers))
            elif roll < 0.85:
                membership.deregister(rng.choice(workers))
            else:
                membership.heartbeat(rng.choice(workers), load=rng.randrange(4))
        delta = RingState.model_validate(
            membership.state(view.version, view.log.next_seq, view.load_version) | {"instance": "test"})
        assert not delta.full
        loads.forget(delta.removed)
        loads.observe(delta.loads, full=False)  # the load channel: changed reports only
        assert {w.worker_id: loads.load(w.worker_id) for w in membership.workers()} == \
            {w.worker_id: w.load for w in membership.workers()}
        view.apply(delta, plan := view.plan(delta), view.ring.merged_with(plan.new))
        # What the gateway's ring sync and the coordinator's sweep then do (in a thread there):
        view.log.forget_points(view.ring, view.ring.without(view.log.releasable(view.ring)))
        membership.log.forget_points(membership.committed_ring)
        fresh = view_of(membership)
        assert view.ring.members == fresh.ring.members == membership.ring.members
        assert list(view.log.entries) == list(fresh.log.entries)
        if not membership.ring.num_active:
            continue
        for i in range(100):
            key = f"conv-{i}"
            expected = membership.route(key)
            route = view.route(key, view.owner(key))
            assert (route.worker_id, route.address) == (expected.worker_id, expected.address)
            assert [(p.worker_id, p.address) for p in route.previous] == list(expected.previous)
