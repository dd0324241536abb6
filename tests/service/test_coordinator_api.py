import asyncio
import json

import httpx
import pytest

from services.common.schemas import RingState
from services.coordinator.api import LARGE_ANSWER_RECORDS
from services.coordinator.app import create_app
from services.coordinator.settings import CoordinatorSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(clock):
    settings = CoordinatorSettings(vnodes=50, ttl_s=5, sweep_interval_s=0.01)
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


async def register(client, worker_id: str, model_name: str | None = "gpt2") -> httpx.Response:
    body = {"worker_id": worker_id, "address": f"http://{worker_id}:8000", "model_name": model_name}
    return await client.post("/register", json=body)


def assert_error(response: httpx.Response, status: int, error_type: str) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]


async def test_health(client):
    response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_register_returns_epoch(client):
    response = await register(client, "w1")
    assert response.status_code == 200
    assert response.json() == {"worker_id": "w1", "address": "http://w1:8000",
                               "model_name": "gpt2", "epoch": 1, "ttl_s": 5.0}
    again = await register(client, "w1")
    assert again.json()["epoch"] == 1


async def test_route_is_sticky(client):
    for i in range(3):
        await register(client, f"w{i}")
    first = await client.get("/route/seq-123")
    assert first.status_code == 200
    body = first.json()
    assert body["seq_id"] == "seq-123" and body["epoch"] == 3
    assert body["address"] == f"http://{body['worker_id']}:8000"
    for _ in range(5):
        assert (await client.get("/route/seq-123")).json() == body


async def test_routes_spread_over_workers(client):
    for i in range(3):
        await register(client, f"w{i}")
    owners = {(await client.get(f"/route/seq-{i}")).json()["worker_id"] for i in range(60)}
    assert owners == {"w0", "w1", "w2"}


async def test_route_without_workers_is_503(client):
    response = await client.get("/route/seq-1")
    assert_error(response, 503, "unavailable")
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize("seq_id", ["bad%20id", "x" * 129, "a%2Cb", "caf%C3%A9"])
async def test_route_with_bad_seq_id_is_400(client, seq_id):
    await register(client, "w1")
    assert_error(await client.get(f"/route/{seq_id}"), 400, "invalid_request")


async def test_unknown_heartbeat_is_404(client):
    assert_error(await client.post("/heartbeat", json={"worker_id": "ghost"}), 404, "not_found")


async def test_heartbeat_keeps_epoch(client):
    await register(client, "w1")
    response = await client.post("/heartbeat", json={"worker_id": "w1"})
    assert response.status_code == 200
    assert response.json() == {"worker_id": "w1", "epoch": 1}


async def test_a_heartbeat_answers_alike_on_the_fast_path_and_through_the_route(client):
    """A body over the fast path's size (JSON padded with spaces) goes through the FastAPI route."""
    await register(client, "w1")
    body = json.dumps({"worker_id": "w1", "load": 2})
    fast = await client.post("/heartbeat", content=body, headers={"content-type": "application/json"})
    routed = await client.post("/heartbeat", content=body + " " * 5000, headers={"content-type": "application/json"})
    assert fast.status_code == routed.status_code == 200
    assert fast.content == routed.content and fast.headers["content-type"] == routed.headers["content-type"]
    assert 'kvcache_coordinator_heartbeats_total{outcome="ok"} 2.0' in (await client.get("/metrics")).text


@pytest.mark.parametrize("path, body", [
    ("/register", {"worker_id": "w1"}),
    ("/register", {"worker_id": "w 1", "address": "http://w1:8000"}),
    ("/register", {"worker_id": "w1", "address": "ftp://w1"}),
    ("/heartbeat", {}),
    ("/heartbeat", {"worker_id": 7}),
    ("/deregister", {"worker_id": ""}),
])
async def test_bad_bodies_are_422(client, path, body):
    assert_error(await client.post(path, json=body), 422, "invalid_request")


async def test_malformed_json_is_422(client):
    response = await client.post("/register", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


async def test_unknown_path_is_json_404(client):
    assert_error(await client.get("/nope"), 404, "not_found")


async def test_deregister_removes_worker(client):
    await register(client, "w1")
    await register(client, "w2")
    response = await client.post("/deregister", json={"worker_id": "w1"})
    assert response.json() == {"worker_id": "w1", "removed": True, "epoch": 3}
    routed = {(await client.get(f"/route/seq-{i}")).json()["worker_id"] for i in range(30)}
    assert routed == {"w2"}
    again = await client.post("/deregister", json={"worker_id": "w1"})
    assert again.status_code == 200
    assert again.json() == {"worker_id": "w1", "removed": False, "epoch": 3}


async def test_workers_listing(client, clock):
    await register(client, "w2", model_name=None)
    await register(client, "w1")
    clock.now = 2.5
    await client.post("/heartbeat", json={"worker_id": "w1"})
    body = (await client.get("/workers")).json()  # the reference implementation's map shape
    assert list(body) == ["w1", "w2"]
    w1, w2 = body["w1"], body["w2"]
    assert w1 == {"worker_id": "w1", "address": "http://w1:8000", "model_name": "gpt2",
                  "served_model_names": [], "state": "active", "age_s": 2.5,
                  "last_heartbeat_age_s": 0.0, "load": 0}
    assert w2["model_name"] is None and w2["last_heartbeat_age_s"] == 2.5


async def test_large_answers_are_the_same_json(client):
    """Past LARGE_ANSWER_RECORDS, /ring and /workers are serialised in a thread: same content."""
    worker_ids = [f"w{i:03d}" for i in range(LARGE_ANSWER_RECORDS + 20)]
    for worker_id in worker_ids:
        await register(client, worker_id)
    listing = (await client.get("/workers")).json()
    assert list(listing) == worker_ids and listing["w007"]["address"] == "http://w007:8000"
    ring = RingState.model_validate((await client.get("/ring")).json())
    assert ring.full and [w.worker_id for w in ring.workers] == worker_ids
    delta = (await client.get("/ring", params={"after": 0, "seq": 1, "instance": ring.instance})).json()
    assert not delta["full"] and len(delta["workers"]) == len(worker_ids)


async def test_served_names_and_window_reach_the_ring(client):
    response = await client.post("/register", json={
        "worker_id": "w1", "address": "http://w1:8000", "model_name": "gpt2-small-random",
        "served_model_names": ["gpt2", "gpt2-small-random"], "max_model_len": 1024})
    assert response.status_code == 200
    version = (await client.get("/ring")).json()["version"]
    [worker] = (await client.get("/ring")).json()["workers"]
    assert worker["served_model_names"] == ["gpt2", "gpt2-small-random"] and worker["max_model_len"] == 1024
    assert (await client.get("/workers")).json()["w1"]["served_model_names"] == ["gpt2", "gpt2-small-random"]
    await client.post("/register", json={"worker_id": "w1", "address": "http://w1:8000",
                                         "model_name": "gpt2-small-random", "served_model_names": ["x"]})
    ring = (await client.get("/ring")).json()
    assert ring["version"] > version and ring["workers"][0]["served_model_names"] == ["x"]
    too_long = await client.post("/register", json={"worker_id": "w1", "address": "http://w1:8000",
                                                    "served_model_names": ["a" * 257]})
    assert too_long.status_code == 422


async def test_kv_route_is_route(client):
    """The reference implementation's path: the same body as /route."""
    await register(client, "w1")
    await register(client, "w2")
    for seq_id in ("seq-1", "seq-2", "seq-3"):
        assert (await client.get(f"/kv/route/{seq_id}")).json() == await route_of(client, seq_id)
    assert_error(await client.get("/kv/route/bad%20id"), 400, "invalid_request")


async def test_stats(client):
    empty = (await client.get("/stats")).json()
    assert empty == {"epoch": 0, "num_workers": 0, "num_draining": 0, "ring_points": 0,
                     "vnodes": 50, "share": {}}
    for i in range(4):
        await register(client, f"w{i}")
    stats = (await client.get("/stats")).json()
    assert stats["epoch"] == 4 and stats["num_workers"] == 4
    assert stats["ring_points"] == 200 and stats["vnodes"] == 50
    assert set(stats["share"]) == {"w0", "w1", "w2", "w3"}
    assert sum(stats["share"].values()) == pytest.approx(1.0)


async def test_metrics(client):
    await register(client, "w1")
    await client.get("/route/seq-1")
    await client.get("/route/bad%20id")
    await client.post("/heartbeat", json={"worker_id": "ghost"})
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert 'kvcache_coordinator_route_requests_total{outcome="ok"} 1.0' in text
    assert 'kvcache_coordinator_route_requests_total{outcome="invalid"} 1.0' in text
    assert 'kvcache_coordinator_route_requests_total{outcome="unavailable"} 0.0' in text
    assert 'kvcache_coordinator_heartbeats_total{outcome="unknown"} 1.0' in text
    assert 'kvcache_coordinator_ring_changes_total{change="join"} 1.0' in text
    assert "kvcache_coordinator_registered_workers 1.0" in text
    assert "kvcache_coordinator_epoch 1.0" in text


async def test_apps_have_separate_state_and_metrics():
    first, second = create_app(CoordinatorSettings()), create_app(CoordinatorSettings())
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=first),
                                     base_url="http://test") as http:
            await register(http, "w1")
        assert len(first.state.membership) == 1 and len(second.state.membership) == 0
        assert first.state.metrics.registry is not second.state.metrics.registry
        registry = second.state.metrics.registry
        assert registry.get_sample_value("kvcache_coordinator_registered_workers") == 0


async def wait_for(predicate, timeout_s: float = 5.0) -> None:
    """Polls until the sweep task has run; the timeout only bounds a failing test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_sweep_expires_silent_workers(client, clock):
    await register(client, "w1")
    await register(client, "w2")
    clock.now = 4.0
    await client.post("/heartbeat", json={"worker_id": "w2"})
    clock.now = 6.0  # w1 silent 6 s > ttl 5 s; w2 silent 2 s

    async def only_w2_left() -> bool:
        return list((await client.get("/workers")).json()) == ["w2"]

    await wait_for(only_w2_left)
    assert (await client.get("/stats")).json()["epoch"] == 3
    assert (await client.get("/route/seq-1")).json()["worker_id"] == "w2"
    assert_error(await client.post("/heartbeat", json={"worker_id": "w1"}), 404, "not_found")
    assert 'change="expire"} 1.0' in (await client.get("/metrics")).text
    assert (await register(client, "w1")).json()["epoch"] == 4


async def test_lifespan_cancels_its_tasks_on_shutdown():
    app = create_app(CoordinatorSettings(sweep_interval_s=0.01))
    before = asyncio.all_tasks()
    async with app.router.lifespan_context(app):
        started = asyncio.all_tasks() - before
        # the TTL sweep, the ring point builder, the event-loop stall monitor
        assert len(started) == 3
    assert all(task.done() and task.cancelled() for task in started)


async def route_of(client, seq_id: str, **params) -> dict:
    response = await client.get(f"/route/{seq_id}", params=params)
    assert response.status_code == 200
    return response.json()


async def test_drain_takes_worker_off_the_ring(client):
    for i in range(3):
        await register(client, f"w{i}")
    owner = (await route_of(client, "seq-7"))["worker_id"]
    response = await client.post("/drain", json={"worker_id": owner})
    assert response.status_code == 200
    assert response.json() == {"worker_id": owner, "draining": True, "epoch": 4, "active_workers": 2}
    again = await client.post("/drain", json={"worker_id": owner})
    assert again.json() == {"worker_id": owner, "draining": True, "epoch": 4, "active_workers": 2}

    route = await route_of(client, "seq-7")
    assert route["worker_id"] != owner and route["epoch"] == 4
    assert route["previous"] == [{"worker_id": owner, "address": f"http://{owner}:8000"}]
    states = {w_id: w["state"] for w_id, w in (await client.get("/workers")).json().items()}
    assert states == {f"w{i}": ("draining" if f"w{i}" == owner else "active") for i in range(3)}
    stats = (await client.get("/stats")).json()
    assert stats["num_workers"] == 3 and stats["num_draining"] == 1 and stats["ring_points"] == 100
    assert owner not in stats["share"]
    assert (await client.post("/heartbeat", json={"worker_id": owner})).status_code == 200
    text = (await client.get("/metrics")).text
    assert 'kvcache_coordinator_ring_changes_total{change="drain"} 1.0' in text
    assert "kvcache_coordinator_draining_workers 1.0" in text
    assert "kvcache_coordinator_registered_workers 3.0" in text


async def test_drain_unknown_worker_is_404(client):
    assert_error(await client.post("/drain", json={"worker_id": "ghost"}), 404, "not_found")
    assert_error(await client.post("/drain", json={"worker_id": "w 1"}), 422, "invalid_request")


async def test_register_draining_stays_off_the_ring(client):
    await register(client, "w1")
    body = {"worker_id": "w2", "address": "http://w2:8000", "draining": True}
    assert (await client.post("/register", json=body)).status_code == 200
    assert {(await route_of(client, f"seq-{i}"))["worker_id"] for i in range(30)} == {"w1"}
    await client.post("/deregister", json={"worker_id": "w1"})
    assert_error(await client.get("/route/seq-1"), 503, "unavailable")
    await register(client, "w2")  # registering active again rejoins
    assert (await route_of(client, "seq-1"))["worker_id"] == "w2"


async def test_route_previous_after_scale_out(client):
    for i in range(3):
        await register(client, f"w{i}")
    before = {f"seq-{i}": (await route_of(client, f"seq-{i}"))["worker_id"] for i in range(60)}
    await register(client, "w3")
    moved = 0
    for seq_id, old in before.items():
        route = await route_of(client, seq_id)
        if route["worker_id"] != old:
            moved += 1
            assert route["worker_id"] == "w3"
            assert route["previous"][0] == {"worker_id": old, "address": f"http://{old}:8000"}
        assert all(p["worker_id"] != route["worker_id"] for p in route["previous"])
    assert moved > 0


async def test_route_exclude(client):
    for i in range(3):
        await register(client, f"w{i}")
    owner = (await route_of(client, "seq-7"))["worker_id"]
    route = await route_of(client, "seq-7", exclude=owner)
    assert route["worker_id"] != owner
    assert owner not in [p["worker_id"] for p in route["previous"]]
    other = route["worker_id"]
    last = await route_of(client, "seq-7", exclude=f"{owner},{other},ghost")
    assert last["worker_id"] not in (owner, other)
    assert (await route_of(client, "seq-7", exclude=""))["worker_id"] == owner
    response = await client.get("/route/seq-7", params={"exclude": "w0,w1,w2"})
    assert_error(response, 503, "unavailable")


@pytest.mark.parametrize("exclude", ["w 1", "w1,,w2", ",", "x" * 129, "w1,caf\u00e9"])
async def test_route_with_bad_exclude_is_400(client, exclude):
    await register(client, "w1")
    assert_error(await client.get("/route/seq-1", params={"exclude": exclude}), 400, "invalid_request")
    text = (await client.get("/metrics")).text
    assert 'kvcache_coordinator_route_requests_total{outcome="invalid"} 1.0' in text


TOKEN = "s3cret-token"


@pytest.fixture
async def guarded(clock):
    settings = CoordinatorSettings(vnodes=50, ttl_s=5, sweep_interval_s=0.01, internal_token=TOKEN)
    app = create_app(settings, clock=clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


PROTECTED = [
    ("/register", {"worker_id": "w1", "address": "http://w1:8000"}),
    ("/heartbeat", {"worker_id": "w1"}),
    ("/drain", {"worker_id": "w1"}),
    ("/deregister", {"worker_id": "w1"}),
]


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN}, {"Authorization": "Bearer "},
])
async def test_membership_calls_need_the_token(guarded, headers, caplog):
    for path, body in PROTECTED:
        response = await guarded.post(path, json=body, headers=headers)
        assert_error(response, 401, "unauthorized")
        assert TOKEN not in response.text
    assert (await guarded.get("/workers")).json() == {}
    assert TOKEN not in caplog.text


async def test_membership_calls_pass_with_the_token(guarded, caplog):
    caplog.set_level("DEBUG")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for path, body in PROTECTED:
        response = await guarded.post(path, json=body, headers=headers)
        assert response.status_code == 200, (path, response.text)
        assert response.json()["worker_id"] == "w1"
    again = await guarded.post("/deregister", json={"worker_id": "w1"}, headers=headers)
    assert again.json()["removed"] is False
    assert TOKEN not in caplog.text


async def test_lookups_stay_open_with_a_token(guarded):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    await guarded.post("/register", json=PROTECTED[0][1], headers=headers)
    assert (await route_of(guarded, "seq-1"))["worker_id"] == "w1"
    for path in ("/workers", "/stats", "/health", "/metrics"):
        assert (await guarded.get(path)).status_code == 200, path


async def test_no_token_configured_needs_no_header(client):
    assert (await register(client, "w1")).status_code == 200
    assert (await client.post("/drain", json={"worker_id": "w1"},
                              headers={"Authorization": "Bearer anything"})).status_code == 200


async def on_ring_for_routers(client, *worker_ids: str) -> dict:
    """GET /ring once the point builder has put these workers on the ring routers see (it merges
    new workers' points off the event loop, one batch every 50 ms)."""
    async with asyncio.timeout(5):
        while True:
            body = (await client.get("/ring")).json()
            active = {w["worker_id"] for w in body["workers"] if w["state"] == "active"}
            if active >= set(worker_ids):
                return body
            await asyncio.sleep(0.01)


async def test_a_new_worker_reaches_routers_after_its_points_are_built(client):
    await register(client, "w1")
    assert (await client.get("/ring")).json()["workers"][0]["state"] == "draining"  # not on it yet
    body = await on_ring_for_routers(client, "w1")
    assert [c["toggles"] for c in body["changes"]] == [[["w1", True]]]
    assert (await route_of(client, "seq-1"))["worker_id"] == "w1"


async def test_ring_snapshot_lists_workers_loads_and_retired_rings(client):
    await register(client, "w1")
    await register(client, "w2")
    await on_ring_for_routers(client, "w1", "w2")  # a router read this ring: it enters the window
    await client.post("/heartbeat", json={"worker_id": "w2", "load": 3})
    await client.post("/drain", json={"worker_id": "w1"})
    body = (await client.get("/ring")).json()
    assert body["epoch"] == 3 and body["version"] == 5 and body["vnodes"] == 50 and body["settling"] is True
    assert body["load_version"] == 1 and body["full"] is True
    assert {w["worker_id"]: (w["state"], w["load"], w["load_reports"]) for w in body["workers"]} == {
        "w1": ("draining", 0, 0), "w2": ("active", 3, 1)}
    # The joins were read as one ring change, then the drain.
    assert [(c["toggles"], c["num_active_before"]) for c in body["changes"]] == [
        ([["w1", True], ["w2", True]], 0), ([["w1", False]], 2)]
    delta = (await client.get("/ring", params={"after": 5, "seq": 3, "load_after": 1,
                                               "instance": body["instance"]})).json()
    assert delta["full"] is False and delta["workers"] == delta["changes"] == delta["loads"] == []
    await client.post("/heartbeat", json={"worker_id": "w2", "load": 5})
    delta = (await client.get("/ring", params={"after": 5, "seq": 3, "load_after": 1,
                                               "instance": body["instance"], "wait_s": 5})).json()
    assert delta["workers"] == [] and delta["loads"] == [{"worker_id": "w2", "load": 5, "load_reports": 2}]


async def test_ring_long_poll_answers_when_the_version_moves(client):
    await register(client, "w1")
    first = await on_ring_for_routers(client, "w1")
    args = {"after": first["version"], "instance": first["instance"], "wait_s": 5}
    poll = asyncio.create_task(client.get("/ring", params=args))
    await asyncio.sleep(0.05)
    assert not poll.done()  # nothing changed: it waits
    await client.post("/heartbeat", json={"worker_id": "w1", "load": 0})  # an unchanged load
    await asyncio.sleep(0.05)
    assert not poll.done()
    await register(client, "w2")
    answer = (await asyncio.wait_for(poll, 2)).json()
    assert answer["version"] == first["version"] + 1 and answer["full"] is False
    assert [w["worker_id"] for w in answer["workers"]] == ["w2"]  # a delta: the changed worker only
    built = await on_ring_for_routers(client, "w1", "w2")  # its points: one more version
    assert built["version"] == answer["version"] + 1
    timed_out = await client.get("/ring", params=args | {"after": built["version"], "wait_s": 0.05})
    assert timed_out.json()["version"] == built["version"]
    other = await client.get("/ring", params=args | {"instance": "an-earlier-coordinator", "wait_s": 5})
    assert other.json()["version"] == built["version"]  # another instance's version: no wait
    assert_error(await client.get("/ring", params={"wait_s": 61}), 422, "invalid_request")
