"""The gateway's KV tensor API in-process, in front of a fake coordinator and fake workers on
loopback: what it sends to which worker (the owner, the tenant's seq_id, the internal token), what
it answers the client (its own seq_id), and its errors when the owner is gone or misbehaves."""

import asyncio
import contextlib

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from services.common.errors import error_body
from services.common.hash_ring import HashRing
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from services.gateway.tenants import internal_seq_id, tenant_of
from tests.loopback import LoopbackServer
from tests.service.test_gateway_api import INTERNAL_TOKEN, RING_VNODES, Cluster, fake_coordinator, owned_by

KEY = "kv-gateway-key-0123456789"
TENSOR = {"data": "AAAAAA==", "shape": [1, 1, 1], "dtype": "torch.float32", "encoding": "raw"}


class FakeKVWorker:
    """Records what reaches it; answers what the test sets (default: a put's success body)."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.calls: list[tuple[str, str, dict | None, str | None]] = []  # method, path, body, authorization
        self.answer = None
        self.app = FastAPI()
        self.app.api_route("/kv/{rest:path}", methods=["GET", "POST", "DELETE"])(self.handle)

    async def handle(self, rest: str, request: Request):
        body = await request.json() if request.method == "POST" else None
        self.calls.append((request.method, request.url.path, body, request.headers.get("authorization")))
        if self.answer is not None:
            return self.answer
        seq_id = body["seq_id"] if body else rest.split("/")[0]
        return {"status": "ok", "seq_id": seq_id, "layer": 0, "seq_len": 1, "worker_id": self.worker_id,
                "tensor_shapes": {"k": [1, 1, 1], "v": [1, 1, 1]},
                "tensor_dtypes": {"k": "torch.float32", "v": "torch.float32"}}


@pytest.fixture
async def kv_cluster(request):
    workers = {w: FakeKVWorker(w) for w in ("w1", "w2")}
    cluster = Cluster(workers=workers, active=["w1", "w2"], registered=["w1", "w2"])
    cluster.servers = {w: LoopbackServer(fake.app) for w, fake in workers.items()}
    cluster.servers["coordinator"] = LoopbackServer(fake_coordinator(cluster))
    try:
        for server in cluster.servers.values():
            await server.start()
        settings = GatewaySettings(coordinator_url=cluster.servers["coordinator"].url, internal_token=INTERNAL_TOKEN,
                                   **getattr(request, "param", {}))
        app = cluster.app = create_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway") as client:
                cluster.gateway = client
                yield cluster
    finally:
        cluster.changed.set()
        await asyncio.sleep(0.01)
        for server in cluster.servers.values():
            with contextlib.suppress(Exception):
                await server.stop()


def put_body(seq_id: str) -> dict:
    return {"seq_id": seq_id, "layer": 0, "k": TENSOR, "v": TENSOR}


async def test_each_call_goes_to_the_seq_ids_owner_with_the_internal_token(kv_cluster):
    for owner in ("w1", "w2"):
        seq_id = owned_by(owner, ["w1", "w2"], prefix="kv")
        calls = [("POST", "/kv/put", put_body(seq_id)), ("POST", "/kv/append", put_body(seq_id)),
                 ("POST", "/kv/get", {"seq_id": seq_id, "layer": 0}), ("GET", f"/kv/{seq_id}/3/length", None),
                 ("DELETE", f"/kv/{seq_id}", None)]
        for method, path, body in calls:
            answer = await kv_cluster.gateway.request(method, path, json=body)
            assert answer.status_code == 200 and answer.json()["worker_id"] == owner, answer.text
        seen = kv_cluster.workers[owner].calls[-5:]
        assert [(m, p) for m, p, _, _ in seen] == [(m, p) for m, p, _ in calls]
        assert {auth for *_, auth in seen} == {f"Bearer {INTERNAL_TOKEN}"}
        assert seen[0][2] == put_body(seq_id) and seen[2][2] == {"seq_id": seq_id, "layer": 0, "encoding": "torch"}
    assert len(kv_cluster.workers["w1"].calls) == len(kv_cluster.workers["w2"].calls) == 5


@pytest.mark.parametrize("kv_cluster", [{"api_keys": KEY}], indirect=True)
async def test_with_keys_the_worker_sees_the_tenants_seq_id_and_the_client_its_own(kv_cluster):
    internal = internal_seq_id(tenant_of(KEY.encode(), {}), "mine")
    owner = HashRing.of(["w1", "w2"], RING_VNODES).owner(internal)
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = await kv_cluster.gateway.post("/kv/put", json=put_body("mine"), headers=headers)
    assert answer.status_code == 200 and answer.json()["seq_id"] == "mine"
    _, path, body, _ = kv_cluster.workers[owner].calls[-1]
    assert body["seq_id"] == internal != "mine"
    length = await kv_cluster.gateway.get("/kv/mine/0/length", headers=headers)
    assert length.json()["seq_id"] == "mine" and kv_cluster.workers[owner].calls[-1][1] == f"/kv/{internal}/0/length"
    assert (await kv_cluster.gateway.post("/kv/put", json=put_body("mine"))).status_code == 401


async def test_an_unreachable_owner_is_503_and_the_call_goes_nowhere_else(kv_cluster):
    seq_id = owned_by("w1", ["w1", "w2"], prefix="kv")
    await kv_cluster.servers["w1"].stop()
    answer = await kv_cluster.gateway.post("/kv/get", json={"seq_id": seq_id, "layer": 0})
    assert answer.status_code == 503 and answer.json()["error"]["type"] == "unavailable"
    assert answer.headers["retry-after"] == "1"
    assert kv_cluster.workers["w2"].calls == []


async def test_worker_errors_pass_through_and_invalid_answers_are_502(kv_cluster):
    seq_id = owned_by("w1", ["w1", "w2"], prefix="kv")
    worker = kv_cluster.workers["w1"]
    cases = [(JSONResponse(error_body("kv_too_large", "too big"), status_code=413), 413, "kv_too_large"),
             (JSONResponse(error_body("invalid_tensor", "bad"), status_code=400), 400, "invalid_tensor"),
             (JSONResponse(error_body("unauthorized", "no"), status_code=401), 502, "upstream_error"),
             (PlainTextResponse("Internal Server Error", status_code=500), 502, "upstream_error"),
             (JSONResponse(["not", "an", "object"]), 502, "upstream_error")]
    for worker_answer, status, error_type in cases:
        worker.answer = worker_answer
        answer = await kv_cluster.gateway.post("/kv/put", json=put_body(seq_id))
        assert answer.status_code == status and answer.json()["error"]["type"] == error_type, answer.text
