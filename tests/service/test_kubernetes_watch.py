"""The EndpointSlice watcher and the coordinator in kubernetes mode, against a loopback server
that speaks the list/watch protocol with real EndpointSlice JSON (tests/fake_kube_api.py). No
real Kubernetes API server runs here."""

import asyncio
import contextlib

import httpx
import pytest

from services.coordinator.app import create_app
from services.coordinator.endpoint_slices import AddressForm
from services.coordinator.kubernetes_watch import EndpointSliceWatcher
from services.coordinator.settings import CoordinatorSettings
from tests.endpoint_slice_docs import NAMESPACE, SERVICE, dns_address, endpoint
from tests.fake_kube_api import FakeKubeApi
from tests.loopback import LoopbackServer

TOKEN = "eyJhbGciOiJSUzI1NiJ9.test-token"


@pytest.fixture
def serviceaccount(tmp_path):
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "namespace").write_text(NAMESPACE)
    return tmp_path


@pytest.fixture
async def api():
    fake = FakeKubeApi()
    server = LoopbackServer(fake)
    await server.start()
    fake.server = server
    yield fake
    fake.end_watches()
    for _ in range(100):  # let the streams end before the server goes (a stop cancels them)
        if not fake.num_streams:
            break
        await asyncio.sleep(0.01)
    await server.stop()


class Watch:
    """A running watcher and what it handed on."""

    def __init__(self, api: FakeKubeApi, serviceaccount) -> None:
        self.listed: list[dict] = []
        self.restarts: list[str] = []
        self.client = httpx.AsyncClient()
        form = AddressForm(service=SERVICE, namespace=NAMESPACE)
        self.watcher = EndpointSliceWatcher(
            self.client, api.server.url, form, lambda desired: self.listed.append(dict(desired)),
            token_file=serviceaccount / "token", min_backoff_s=0.02, max_backoff_s=0.1,
            on_restart=self.restarts.append)
        self.task = asyncio.create_task(self.watcher.run())

    def states(self) -> dict[str, str]:
        return {w: e.state for w, e in self.listed[-1].items()} if self.listed else {}

    async def until(self, predicate, what: str) -> None:
        for _ in range(500):  # 5 s
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}; listed {self.states()}, restarts {self.restarts}")

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.client.aclose()


@pytest.fixture
async def watch(api, serviceaccount):
    api.put("worker-aaaaa", [endpoint("worker-0", "10.8.1.12"), endpoint("worker-1", "10.8.1.13")])
    api.put("worker-bbbbb", [endpoint("worker-2", "10.8.2.7", serving=False)])
    w = Watch(api, serviceaccount)
    await w.until(lambda: api.kinds() == ["list", "watch"], "the watch")
    yield w
    await w.close()


async def test_lists_then_watches_from_the_listed_version_with_the_token(api, watch):
    assert watch.states() == {"worker-0": "active", "worker-1": "active"}
    (_, list_query, list_auth), (_, watch_query, watch_auth) = api.requests
    assert list_query == {"labelSelector": "kubernetes.io/service-name=worker"}
    assert watch_query["resourceVersion"] == "102" and watch_query["allowWatchBookmarks"] == "true"
    assert list_auth == watch_auth == f"Bearer {TOKEN}"


async def test_watch_events_change_what_is_listed(api, watch):
    api.put("worker-bbbbb", [endpoint("worker-2", "10.8.2.7")])
    await watch.until(lambda: watch.states().get("worker-2") == "active", "worker-2 ready")
    api.put("worker-aaaaa", [endpoint("worker-0", "10.8.1.12", terminating=True), endpoint("worker-1", "10.8.1.13")])
    await watch.until(lambda: watch.states().get("worker-0") == "draining", "worker-0 terminating")
    api.delete("worker-aaaaa")
    await watch.until(lambda: watch.states() == {"worker-2": "active"}, "the slice deleted")
    assert api.kinds() == ["list", "watch"]


async def test_an_ended_watch_resumes_from_the_last_bookmark_without_listing(api, watch):
    api.bookmark()
    await watch.until(lambda: watch.watcher.slices.resource_version == str(api.version), "the bookmark")
    api.end_watches()  # the server's timeoutSeconds
    await watch.until(lambda: api.kinds() == ["list", "watch", "watch"], "a new watch")
    assert api.requests[-1][1]["resourceVersion"] == str(api.version)
    assert watch.restarts == []


async def test_410_gone_lists_again_and_catches_up_on_what_it_missed(api, watch):
    api.end_watches()
    api.fail_watches.append(503)  # the next watch fails: the watcher pauses, changes land meanwhile
    api.put("worker-ccccc", [endpoint("worker-3", "10.8.3.3")])
    api.compact()  # ...and the server forgets them: the watch from the old version gets 410 Gone
    await watch.until(lambda: watch.states().get("worker-3") == "active" and len(api.requests) == 6,
                      "worker-3 after a relist, and the watch after it")
    assert api.kinds() == ["list", "watch", "watch", "watch", "list", "watch"]
    assert watch.restarts == ["failed", "expired"]


async def test_410_as_the_response_status_also_lists_again(api, watch):
    api.fail_watches.append(410)
    api.end_watches()
    await watch.until(lambda: api.kinds()[-2:] == ["list", "watch"] and len(api.requests) == 5, "a relist")
    assert watch.restarts == ["expired"]


async def test_reconnects_after_the_api_server_was_unreachable(api, watch):
    await api.server.stop()  # connections reset, the port refuses
    api.put("worker-bbbbb", [endpoint("worker-2", "10.8.2.7")])
    await watch.until(lambda: len(watch.restarts) >= 2, "failed reconnects")
    await api.server.start()
    await watch.until(lambda: watch.states().get("worker-2") == "active", "the event made while down")
    assert set(watch.restarts) == {"failed"}
    assert api.kinds()[0] == "list" and "list" not in api.kinds()[1:]  # resumed from its version


async def test_a_refused_list_is_retried(api, serviceaccount):
    api.put("worker-aaaaa", [endpoint("worker-0", "10.8.1.12")])
    api.fail_lists.extend([403, 500])
    w = Watch(api, serviceaccount)
    try:
        await w.until(lambda: w.states() == {"worker-0": "active"}, "the list")
        assert w.restarts == ["failed", "failed"]
    finally:
        await w.close()


async def test_coordinator_in_kubernetes_mode_routes_to_listed_workers_before_any_registration(api, serviceaccount):
    api.put("worker-aaaaa", [endpoint("worker-0", "10.8.1.12"), endpoint("worker-1", "10.8.1.13")])
    settings = CoordinatorSettings(vnodes=50, ttl_s=5, sweep_interval_s=0.01, membership="kubernetes",
                                   k8s_api_url=api.server.url, k8s_serviceaccount_dir=str(serviceaccount))
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for _ in range(500):
                ring = (await http.get("/ring")).json()
                if len(ring["workers"]) == 2 and all(w["state"] == "active" for w in ring["workers"]):
                    break
                await asyncio.sleep(0.01)
            assert {w["worker_id"]: w["address"] for w in ring["workers"]} == \
                {"worker-0": dns_address("worker-0"), "worker-1": dns_address("worker-1")}
            assert ring["settling"]  # listed, but no worker has told its model yet
            route = (await http.get("/route/seq-1")).json()
            assert route["address"] == dns_address(route["worker_id"])
            beat = await http.post("/heartbeat", json={"worker_id": "worker-0", "load": 1})
            assert beat.status_code == 404  # not registered with this process: register
            for w in ("worker-0", "worker-1"):
                body = {"worker_id": w, "address": dns_address(w), "model_name": "gpt2"}
                assert (await http.post("/register", json=body)).status_code == 200
            assert (await http.post("/heartbeat", json={"worker_id": "worker-0", "load": 1})).status_code == 200
            ring = (await http.get("/ring")).json()
            assert not ring["settling"] and {w["model_name"] for w in ring["workers"]} == {"gpt2"}
            metrics = (await http.get("/metrics")).text
            assert 'kvcache_coordinator_kubernetes_watch_restarts_total{reason="expired"} 0.0' in metrics
