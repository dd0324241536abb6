"""The gateway in-process, in front of a fake coordinator and fake workers served on loopback in the
test's event loop (real HTTP: tests/loopback.py)."""

import asyncio
import contextlib
import json
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.common.errors import error_body
from services.common.sse import aparse_events, encode_event, parse_events
from services.common.hash_ring import HashRing
from services.gateway.app import create_app
from services.gateway.routing import PARSE_OFF_LOOP_BYTES
from services.gateway.settings import GatewaySettings
from tests.loopback import LoopbackServer, refused_address

_END = object()
WAIT_S = 5.0  # guards against a hung test only; nothing asserts on time


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue, disconnected: asyncio.Event) -> None:
        self._chunks = chunks
        self._disconnected = disconnected

    async def __aiter__(self):
        while (item := await self._chunks.get()) is not _END:
            if isinstance(item, Exception):
                raise httpx.ReadError(f"connection broke: {item!r}")
            yield item

    async def aclose(self) -> None:
        self._disconnected.set()


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """Like httpx.ASGITransport, but streams the response (0.28 buffers it whole), tells the app
    `http.disconnect` once the response is closed, and turns an app failure mid-body into ReadError."""

    def __init__(self, app) -> None:
        self.app = app
        self._tasks: set[asyncio.Task] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([chunk async for chunk in request.stream])
        start = asyncio.get_running_loop().create_future()
        chunks: asyncio.Queue = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.set_result(message)
            elif message["type"] == "http.response.body":
                await chunks.put(message.get("body", b""))
                if not message.get("more_body", False):
                    await chunks.put(_END)

        async def run_app() -> None:
            try:
                await self.app(_scope(request), receive, send)
            except Exception as exc:
                if not start.done():
                    start.set_exception(exc)
                await chunks.put(exc)
            await chunks.put(_END)

        task = asyncio.create_task(run_app())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        message = await start
        return httpx.Response(message["status"], headers=message.get("headers", []),
                              stream=_ResponseStream(chunks, disconnected))

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _scope(request: httpx.Request) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": request.method, "scheme": request.url.scheme,
        "path": request.url.path,
        "raw_path": request.url.raw_path.split(b"?")[0], "query_string": request.url.query,
        "headers": [(k.lower(), v) for k, v in request.headers.raw],
        "server": (request.url.host, request.url.port), "client": ("127.0.0.1", 1234), "root_path": "",
    }


class FakeWorker:
    """mode: ok | bad_request | overloaded | draining | busy (409 on DELETE) | truncate (no
    terminal event) | break (dies mid-stream) | hang (waits after the first token until the client
    goes away). A `resume` body continues after the tokens it names, like a real worker.
    POST /completions answers a stateless request (not streamed)."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.mode = "ok"
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []  # each request's Authorization header
        self.sequences: set[str] = set()
        self.stream_cancelled = asyncio.Event()
        self.resets = 0  # POST /internal/reset_prefix_cache calls
        self.app = self._build_app()

    def done_fields(self, body: dict) -> dict:
        return {"seq_id": body["seq_id"], "worker_id": self.worker_id, "text": body["prompt"].upper(),
                "finish_reason": "length", "usage": {"prompt_tokens": 2, "cached_tokens": 0,
                                                     "completion_tokens": 2, "context_tokens": 4},
                "timings": {"ttft_ms": 1.0, "prefill_ms": 1.0, "decode_ms": 1.0}}

    def events(self, body: dict) -> list[dict]:
        start = {"type": "start", "seq_id": body["seq_id"], "worker_id": self.worker_id,
                 "context_tokens": 2, "cached_tokens": 0}
        skip = len((body.get("resume") or {}).get("generated_ids", []))
        tokens = [{"type": "token", "index": i, "token": word.upper(), "token_id": i}
                  for i, word in enumerate(body["prompt"].split()) if i >= skip]
        return [start, *tokens, {"type": "done", **self.done_fields(body)}]

    async def _stream(self, body: dict):
        try:
            yield b": ping\n\n"
            for event in self.events(body)[:-1 if self.mode != "ok" else None]:
                yield encode_event(event)
                if event["type"] == "token" and self.mode in ("break", "hang"):
                    break
            if self.mode == "break":
                raise RuntimeError("worker process died")
            if self.mode == "hang":
                await asyncio.Event().wait()
            if self.mode == "ok":
                self.sequences.add(body["seq_id"])
        except asyncio.CancelledError:
            self.stream_cancelled.set()
            raise

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.middleware("http")
        async def record_authorization(request: Request, call_next):
            self.authorizations.append(request.headers.get("authorization"))
            return await call_next(request)

        @app.post("/generate")
        async def generate(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.mode == "bad_request":
                return JSONResponse(error_body("context_too_long", "prompt too long"), status_code=400)
            if self.mode == "overloaded":
                return JSONResponse(error_body("overloaded", "queue full"), status_code=429,
                                    headers={"Retry-After": "3"})
            if self.mode == "draining":
                return JSONResponse(error_body("draining", "leaving"), status_code=503)
            if not body.get("stream", True):
                return self.done_fields(body)
            return StreamingResponse(self._stream(body), media_type="text/event-stream")

        @app.post("/completions")
        async def completions(request: Request):
            body = await request.json()
            self.requests.append(body)
            return {"text": body["prompt"].upper(), "finish_reason": "length",
                    "usage": {"prompt_tokens": 2, "cached_tokens": 0, "completion_tokens": 2, "context_tokens": 4}}

        @app.post("/tokenize")
        async def tokenize(request: Request):
            body = await request.json()
            self.requests.append(body)
            if self.mode == "draining":
                return JSONResponse(error_body("draining", "leaving"), status_code=503)
            tokens = [len(word) for word in body.get("prompt", "").split()]
            return {"count": len(tokens), "max_model_len": 64, "tokens": tokens, "token_strs": None}

        @app.post("/detokenize")
        async def detokenize(request: Request):
            body = await request.json()
            self.requests.append(body)
            return {"prompt": " ".join("x" * n for n in body["tokens"])}

        @app.post("/internal/reset_prefix_cache")
        async def reset_prefix_cache():
            self.resets += 1
            return {"worker_id": self.worker_id, "dropped_entries": 2, "freed_bytes": 100, "running_entries": 0}

        @app.delete("/sequences/{seq_id}")
        async def delete(seq_id: str):
            if self.mode == "busy":
                return JSONResponse(error_body("conflict", "running"), status_code=409)
            if seq_id not in self.sequences:
                return JSONResponse(error_body("not_found", f"no sequence {seq_id}"), status_code=404)
            self.sequences.discard(seq_id)
            return {"seq_id": seq_id, "deleted": True}

        @app.get("/stats")
        async def stats():
            return {"worker_id": self.worker_id, "model_name": "tiny", "sequences": len(self.sequences),
                    "cached_tokens": 10, "kv_bytes_used": 1000, "hits": 3, "hit_rate": 0.5}

        return app


RING_VNODES = 50
INTERNAL_TOKEN = "gateway-to-worker-token"
MAX_BODY_BYTES = 64 * 1024


@dataclass
class Cluster:
    workers: dict[str, FakeWorker]
    servers: dict[str, LoopbackServer] = field(default_factory=dict)  # the workers' and "coordinator"
    gateway: httpx.AsyncClient | None = None
    app: FastAPI | None = None
    active: list[str] = field(default_factory=lambda: ["w1"])      # on the ring
    registered: list[str] = field(default_factory=lambda: ["w1", "w2"])  # the others are draining
    version: int = 1
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    ring_answers: list[tuple[int, int]] = field(default_factory=list)  # (after, version answered)
    served_names: list[str] = field(default_factory=list)  # the workers' served_model_names

    dead_address: str = field(default_factory=refused_address)  # of a worker with no server

    def address(self, worker_id: str) -> str:
        server = self.servers.get(worker_id)
        return server.url if server else self.dead_address

    def snapshot(self) -> dict:
        workers = [{"worker_id": w, "address": self.address(w), "model_name": "tiny",
                    "state": "active" if w in self.active else "draining", "age_s": 5.0,
                    "last_heartbeat_age_s": 0.5, "served_model_names": self.served_names,
                    "max_model_len": 64} for w in self.registered]
        return {"instance": "fake", "version": self.version, "epoch": self.version,
                "vnodes": RING_VNODES, "workers": workers}

    async def set_ring(self, active: list[str], registered: list[str] | None = None) -> None:
        """Changes the fake coordinator's ring and waits until the gateway routes by it."""
        self.active = active
        self.registered = registered if registered is not None else sorted(set(self.registered) | set(active))
        self.version += 1
        self.changed.set()
        self.changed = asyncio.Event()
        ring = self.app.state.proxy.ring
        async with asyncio.timeout(WAIT_S):
            while ring.view is None or ring.view.version != self.version:
                await asyncio.sleep(0.005)


def owned_by(worker_id: str, workers: list[str], prefix: str = "s") -> str:
    """A seq_id whose owner on a ring of `workers` is `worker_id`."""
    ring = HashRing.of(workers, RING_VNODES)
    return next(f"{prefix}-{i}" for i in range(1000) if ring.owner(f"{prefix}-{i}") == worker_id)


def fake_coordinator(cluster: Cluster) -> FastAPI:
    app = FastAPI()

    @app.get("/ring")
    async def ring(after: int = -1, instance: str = "", wait_s: float = 0.0):
        if after >= cluster.version and instance == "fake":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cluster.changed.wait(), wait_s)
        cluster.ring_answers.append((after, cluster.version))
        return cluster.snapshot()

    return app


@pytest.fixture
async def cluster(request):
    """Two fake workers and a fake coordinator on loopback; the gateway with the settings of the
    test's indirect parameter (a dict), if any, over the defaults here."""
    cluster = Cluster(workers={w: FakeWorker(w) for w in ("w1", "w2")})
    cluster.servers = {w: LoopbackServer(fake.app) for w, fake in cluster.workers.items()}
    cluster.servers["coordinator"] = LoopbackServer(fake_coordinator(cluster))
    settings = {"coordinator_url": None, "internal_token": INTERNAL_TOKEN, "max_body_bytes": MAX_BODY_BYTES,
                **getattr(request, "param", {})}
    try:
        for server in cluster.servers.values():
            await server.start()
        settings["coordinator_url"] = cluster.servers["coordinator"].url
        app = cluster.app = create_app(GatewaySettings(**settings))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://gateway") as client:
                cluster.gateway = client
                yield cluster
    finally:
        cluster.changed.set()  # a long poll still waiting ends (not cancelled by stop(): a logged error)
        await asyncio.sleep(0.01)
        for server in cluster.servers.values():
            await server.stop()


def sent_to(cluster: Cluster) -> dict[str, list[str]]:
    return {w: [r["seq_id"] for r in fake.requests] for w, fake in cluster.workers.items()}


def events_of(response: httpx.Response) -> list[dict]:
    return list(parse_events(response.text.splitlines()))


def assert_one_terminal_at_end(events: list[dict]) -> None:
    terminal = [i for i, e in enumerate(events) if e["type"] in ("done", "error")]
    assert terminal == [len(events) - 1]


async def metrics_text(cluster: Cluster) -> str:
    response = await cluster.gateway.get("/metrics")
    assert response.status_code == 200
    return response.text


async def test_stream_relays_events_in_order_with_one_terminal(cluster):
    response = await cluster.gateway.post("/generate", json={"prompt": "hello big world", "seq_id": "s-1"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-seq-id"] == "s-1"
    events = events_of(response)
    assert events == cluster.workers["w1"].events({"seq_id": "s-1", "prompt": "hello big world"})
    assert [e["type"] for e in events] == ["start", "token", "token", "token", "done"]
    assert_one_terminal_at_end(events)


@pytest.mark.parametrize("seq_id", ["user:42.a", ".."])
async def test_given_seq_id_is_routed_and_forwarded(cluster, seq_id):
    body = {"prompt": "hi", "seq_id": seq_id, "max_tokens": 7, "temperature": 0.0}
    response = await cluster.gateway.post("/generate", json=body)
    assert response.status_code == 200
    [sent] = cluster.workers["w1"].requests
    assert sent.pop("handoff_sources") == [] and len(sent.pop("request_id")) == 32
    assert sent == {**body, "stream": True}


async def test_seq_id_is_generated_when_absent(cluster):
    response = await cluster.gateway.post("/generate", json={"prompt": "hi"})
    seq_id = response.headers["x-seq-id"]
    assert len(seq_id) == 32 and int(seq_id, 16) >= 0
    assert cluster.workers["w1"].requests[0]["seq_id"] == seq_id
    assert events_of(response)[0]["seq_id"] == seq_id


async def test_non_streaming_relays_worker_json(cluster):
    response = await cluster.gateway.post("/generate", json={"prompt": "a b", "stream": False, "seq_id": "s2"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-seq-id"] == "s2"
    assert response.json() == cluster.workers["w1"].done_fields({"seq_id": "s2", "prompt": "a b"})
    assert cluster.workers["w1"].requests[0]["stream"] is False


@pytest.mark.parametrize("stream", [True, False])
async def test_worker_400_is_relayed(cluster, stream):
    cluster.workers["w1"].mode = "bad_request"
    response = await cluster.gateway.post("/generate", json={"prompt": "x", "seq_id": "s3", "stream": stream})
    assert response.status_code == 400
    assert response.json() == error_body("context_too_long", "prompt too long")
    assert response.headers["x-seq-id"] == "s3"


async def test_worker_429_is_relayed_with_retry_after(cluster):
    cluster.workers["w1"].mode = "overloaded"
    response = await cluster.gateway.post("/generate", json={"prompt": "x"})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["type"] == "overloaded"
    assert "x-seq-id" in response.headers


@pytest.mark.parametrize("body", [
    {"prompt": ""},
    {"prompt": "x", "seq_id": "bad id!"},
    {"prompt": "x", "seq_id": "a/b"},
    {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "temperature": 3},
    {"prompt": "x", "top_p": 0},
    {"prompt": "x", "surprise": 1},
    {"max_tokens": 5},
    ["not", "an", "object"],
])
async def test_bad_input_is_422_json(cluster, body):
    response = await cluster.gateway.post("/generate", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"
    assert sent_to(cluster) == {"w1": [], "w2": []}


async def test_malformed_json_is_422(cluster):
    response = await cluster.gateway.post("/generate", content=b"{not json",
                                          headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request"


async def test_empty_ring_is_503_json(cluster):
    await cluster.set_ring(active=[])
    response = await cluster.gateway.post("/generate", json={"prompt": "x", "seq_id": "s4"})
    assert response.status_code == 503
    assert response.json() == error_body("unavailable", "no active worker")
    assert response.headers["x-seq-id"] == "s4"


async def test_routes_with_its_last_ring_while_the_coordinator_is_down(cluster):
    cluster.changed.set()  # from now on every long poll answers at once (as a new instance's would)
    await cluster.servers["coordinator"].stop()
    async with asyncio.timeout(WAIT_S):
        while (await cluster.gateway.get("/health")).json()["status"] != "degraded":
            await asyncio.sleep(0.01)
    health = (await cluster.gateway.get("/health")).json()
    assert health["ring"]["coordinator"] == "unreachable" and health["ring"]["active_workers"] == 1
    assert "coordinator unreachable" in health["ring"]["error"]
    response = await cluster.gateway.post("/generate", json={"prompt": "a b", "seq_id": "s-down"})
    assert response.status_code == 200
    assert events_of(response)[-1]["type"] == "done"
    assert (await cluster.gateway.get("/stats")).status_code == 200
    await cluster.servers["coordinator"].start()
    async with asyncio.timeout(WAIT_S):
        while (await cluster.gateway.get("/health")).json()["status"] != "ok":
            await asyncio.sleep(0.01)


async def test_a_gateway_that_never_reached_the_coordinator_answers_503():
    app = create_app(GatewaySettings(coordinator_url=refused_address()))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://gateway") as client:
            response = await client.post("/generate", json={"prompt": "x"})
            assert response.status_code == 503
            assert "gateway has no ring yet" in response.json()["error"]["message"]
            assert (await client.get("/stats")).status_code == 503
            assert (await client.get("/health")).json()["status"] == "degraded"


async def test_a_ring_change_reaches_the_gateway_without_a_request(cluster):
    await cluster.set_ring(active=["w1", "w2"])  # waits for the gateway's view
    assert (1, 2) in cluster.ring_answers  # a long poll waiting on version 1 brought version 2
    answered = len(cluster.ring_answers)
    seq_id = owned_by("w2", ["w1", "w2"])
    response = await cluster.gateway.post("/generate", json={"prompt": "a", "seq_id": seq_id})
    assert events_of(response)[-1]["worker_id"] == "w2"
    assert len(cluster.ring_answers) == answered  # the request asked nothing of the coordinator


async def test_a_large_ring_answer_is_taken_like_a_small_one(cluster):
    """Past PARSE_OFF_LOOP_BYTES the answer is parsed in a thread: same view, same routes."""
    parked = [f"parked-{i:03d}" for i in range(300)]  # registered, draining: off the ring
    cluster.active, cluster.registered = ["w1", "w2"], ["w1", "w2", *parked]
    assert len(json.dumps(cluster.snapshot())) > PARSE_OFF_LOOP_BYTES
    await cluster.set_ring(active=["w1", "w2"], registered=["w1", "w2", *parked])
    view = cluster.app.state.proxy.ring.view
    assert len(view.workers) == 302 and view.draining == set(parked)
    seq_id = owned_by("w2", ["w1", "w2"])
    response = await cluster.gateway.post("/generate", json={"prompt": "a", "seq_id": seq_id})
    assert events_of(response)[-1]["worker_id"] == "w2"


async def fail(server: LoopbackServer, failure: str) -> None:
    """down: the port refuses (the worker cannot have seen a request); reset: each connection is
    reset once a request arrives (it may have)."""
    await server.stop()
    if failure == "reset":
        await server.start(resetting=True)


@pytest.mark.parametrize("failure", ["down", "reset"])
async def test_a_failure_before_the_answer_reroutes_and_retries_once(cluster, failure):
    """A turn carries its id (the worker's session store runs it once): re-sent either way."""
    await cluster.set_ring(active=["w1", "w2"])
    await fail(cluster.servers["w1"], failure)
    seq_id = owned_by("w1", ["w1", "w2"])
    response = await cluster.gateway.post("/generate", json={"prompt": "a b", "seq_id": seq_id})
    assert response.status_code == 200
    assert events_of(response)[-1]["worker_id"] == "w2"  # the unreachable worker is left out
    assert sent_to(cluster) == {"w1": [], "w2": [seq_id]}
    text = await metrics_text(cluster)
    assert "kvcache_gateway_upstream_retries_total 1.0" in text
    assert 'kvcache_gateway_routing_decisions_total{decision="owner"} 1.0' in text
    assert 'kvcache_gateway_routing_decisions_total{decision="rerouted"} 1.0' in text


@pytest.mark.parametrize("failure,resent", [("down", True), ("reset", False)])
async def test_a_completion_is_resent_only_if_no_connection_was_made(cluster, failure, resent):
    """A stateless request has no id that a worker would know again: after a reset it may have
    run, so it is not sent to another worker; the client gets a 502 and may retry itself."""
    await cluster.set_ring(active=["w1", "w2"])
    await fail(cluster.servers["w1"], failure)
    key = owned_by("w1", ["w1", "w2"])
    response = await cluster.gateway.post("/v1/completions", json={"model": "tiny", "prompt": "a b"},
                                          headers={"X-Session-Id": key})
    if resent:
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == "A B"
        assert len(cluster.workers["w2"].requests) == 1
    else:
        assert response.status_code == 502, response.text
        assert response.json()["error"]["type"] == "upstream_error"
        assert "failed before answering" in response.json()["error"]["message"]
        assert cluster.workers["w2"].requests == []


@pytest.mark.parametrize("cluster", [{"max_worker_connections": 1, "connection_wait_s": 0.05}], indirect=True)
async def test_a_worker_with_every_connection_in_use_is_503_with_retry_after(cluster):
    cluster.workers["w1"].mode = "hang"  # the first stream holds the only connection to w1
    async with cluster.gateway.stream("POST", "/generate", json={"prompt": "a b"}) as held:
        async for event in aparse_events(held.aiter_lines()):
            if event["type"] == "token":
                break
        response = await cluster.gateway.post("/generate", json={"prompt": "a b", "stream": False})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "unavailable"
        assert "no free connection to worker w1" in response.json()["error"]["message"]
    await asyncio.wait_for(cluster.workers["w1"].stream_cancelled.wait(), WAIT_S)
    cluster.workers["w1"].mode = "ok"
    response = await cluster.gateway.post("/generate", json={"prompt": "a b", "stream": False})
    assert response.status_code == 200  # the closed stream gave its connection back


async def test_connect_error_on_every_attempt_is_503_json(cluster):
    await cluster.servers["w1"].stop()
    response = await cluster.gateway.post("/generate", json={"prompt": "x", "seq_id": "s6"})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "unavailable"
    assert response.headers["x-seq-id"] == "s6"
    assert "w1 unreachable" in response.json()["error"]["message"]


async def test_draining_worker_is_left_out_and_the_request_rerouted(cluster):
    await cluster.set_ring(active=["w1", "w2"])
    cluster.workers["w1"].mode = "draining"
    seq_id = owned_by("w1", ["w1", "w2"])
    response = await cluster.gateway.post("/generate", json={"prompt": "a b", "seq_id": seq_id})
    assert response.status_code == 200
    assert events_of(response)[-1]["worker_id"] == "w2"
    assert sent_to(cluster) == {"w1": [seq_id], "w2": [seq_id]}


async def test_a_broken_stream_migrates_to_the_new_owner(cluster):
    await cluster.set_ring(active=["w1", "w2"])
    cluster.workers["w1"].mode = "break"  # dies after its first token
    seq_id = owned_by("w1", ["w1", "w2"])
    response = await cluster.gateway.post("/generate", json={"prompt": "a b c", "seq_id": seq_id})
    events = events_of(response)
    assert [e["type"] for e in events] == ["start", "token", "token", "token", "done"]
    assert [e["index"] for e in events if e["type"] == "token"] == [0, 1, 2]
    assert events[0]["worker_id"] == "w1" and events[-1]["worker_id"] == "w2"
    first, = cluster.workers["w1"].requests
    resumed, = cluster.workers["w2"].requests
    assert resumed["resume"] == {"turn_id": first["request_id"], "context_tokens": 2, "generated_ids": [0]}
    assert resumed["request_id"] == first["request_id"] and resumed["prompt"] == "a b c"  # one turn id
    text = await metrics_text(cluster)
    assert 'kvcache_gateway_migrations_total{outcome="ok"} 1.0' in text
    assert 'kvcache_gateway_routing_decisions_total{decision="migrated"} 1.0' in text


@pytest.mark.parametrize("mode", ["truncate", "break"])
async def test_stream_that_breaks_midway_ends_with_one_error_event(cluster, mode):
    await cluster.set_ring(active=["w1", "w2"])
    for worker in cluster.workers.values():  # the migrated stream breaks too
        worker.mode = mode
    response = await cluster.gateway.post("/generate", json={"prompt": "a b c"})
    assert response.status_code == 200
    events = events_of(response)
    assert [e["type"] for e in events[:2]] == ["start", "token"]
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "upstream_error"
    assert_one_terminal_at_end(events)
    assert 'kvcache_gateway_streams_total{outcome="upstream_error"} 1.0' in await metrics_text(cluster)


async def test_client_disconnect_closes_upstream_stream(cluster):
    worker = cluster.workers["w1"]
    worker.mode = "hang"
    seen = []
    async with cluster.gateway.stream("POST", "/generate", json={"prompt": "a b c"}) as response:
        assert response.status_code == 200
        async for event in aparse_events(response.aiter_lines()):
            seen.append(event["type"])
            if event["type"] == "token":
                break
    assert seen == ["start", "token"]
    await asyncio.wait_for(worker.stream_cancelled.wait(), WAIT_S)
    text = await metrics_text(cluster)
    assert "kvcache_gateway_active_streams 0.0" in text
    assert 'kvcache_gateway_streams_total{outcome="client_disconnect"} 1.0' in text


async def test_delete_reaches_every_worker(cluster):
    await cluster.gateway.post("/generate", json={"prompt": "x", "seq_id": "s7"})
    assert "s7" in cluster.workers["w1"].sequences
    response = await cluster.gateway.delete("/sequences/s7")
    assert response.status_code == 200
    assert response.json() == {"seq_id": "s7", "deleted": True}
    response = await cluster.gateway.delete("/sequences/s7")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    cluster.workers["w2"].mode = "busy"  # a request runs on it somewhere: 409 wins
    assert (await cluster.gateway.delete("/sequences/s7")).status_code == 409


async def test_delete_with_bad_seq_id_is_422(cluster):
    response = await cluster.gateway.delete("/sequences/bad%20id")
    assert response.status_code == 422


async def test_stats_aggregates_and_lists_unreachable(cluster):
    await cluster.set_ring(active=["w1"], registered=["w1", "w2", "w3"])
    response = await cluster.gateway.get("/stats")
    assert response.status_code == 200
    body = response.json()
    assert body["num_workers"] == 3
    assert body["unreachable"] == ["w3"]
    assert body["workers"]["w1"]["worker_id"] == "w1"
    assert "error" in body["workers"]["w3"]
    assert body["totals"]["kv_bytes_used"] == 2000
    assert body["totals"]["hits"] == 6
    assert "model_name" not in body["totals"] and "worker_id" not in body["totals"]


async def test_health_needs_no_dependency(cluster):
    for worker in ("w1", "w2"):
        await cluster.servers[worker].stop()
    response = await cluster.gateway.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["ring"]["active_workers"] == 1


async def test_metrics_exposes_gateway_series(cluster):
    await cluster.gateway.post("/generate", json={"prompt": "a"})
    await cluster.gateway.post("/generate", json={"prompt": ""})
    text = await metrics_text(cluster)
    assert 'kvcache_gateway_requests_total{code_class="2xx",endpoint="generate"} 1.0' in text
    assert 'kvcache_gateway_requests_total{code_class="4xx",endpoint="generate"} 1.0' in text
    assert 'kvcache_gateway_streams_total{outcome="done"} 1.0' in text
    assert 'kvcache_gateway_streams_total{outcome="upstream_error"} 0.0' in text  # exported before any
    assert "kvcache_gateway_time_to_first_byte_seconds_count 1.0" in text
    assert "kvcache_gateway_active_streams 0.0" in text


async def test_openapi_documents_every_route_and_there_is_no_debug_endpoint(cluster):
    schema = (await cluster.gateway.get("/openapi.json")).json()
    paths = schema["paths"]
    assert set(paths) == {"/generate", "/sequences/{seq_id}", "/stats", "/health", "/metrics", "/v1/models",
                          "/v1/models/{model_id}", "/v1/chat/completions", "/v1/completions", "/tokenize",
                          "/detokenize", "/reset_prefix_cache", "/version",
                          "/kv/put", "/kv/get", "/kv/append", "/kv/{seq_id}/{layer}/length", "/kv/{seq_id}"}
    for path, kind in (("/generate", "GenerateResult"), ("/v1/chat/completions", "ChatCompletion"),
                       ("/v1/completions", "TextCompletion")):
        content = paths[path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        assert content["application/json"]["schema"]["$ref"].endswith("/" + kind)
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert {"404", "409", "503"} <= set(paths["/sequences/{seq_id}"]["delete"]["responses"])
    v1_error = paths["/v1/chat/completions"]["post"]["responses"]["400"]["content"]["application/json"]
    assert v1_error["schema"]["$ref"].endswith("/OpenAIErrorBody")
    assert (await cluster.gateway.get("/docs")).status_code == 200
    for path in ("/redoc", "/debug"):
        response = await cluster.gateway.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found"


async def test_every_call_to_a_worker_carries_the_internal_token(cluster):
    worker = cluster.workers["w1"]
    await cluster.gateway.post("/generate", json={"prompt": "a b", "seq_id": "tok-1"})
    await cluster.gateway.post("/generate", json={"prompt": "a b", "seq_id": "tok-1", "stream": False})
    await cluster.gateway.delete("/sequences/tok-1")
    await cluster.gateway.get("/stats")
    assert len(worker.authorizations) == 4
    assert set(worker.authorizations) == {f"Bearer {INTERNAL_TOKEN}"}


@pytest.mark.parametrize("path,body", [
    ("/generate", {"prompt": "x" * MAX_BODY_BYTES}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}),
    ("/v1/completions", {"model": "tiny", "prompt": "x" * MAX_BODY_BYTES}),
])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_413_and_reaches_no_worker(cluster, path, body, chunked):
    raw = json.dumps(body).encode()

    async def pieces():
        for i in range(0, len(raw), 8192):
            yield raw[i:i + 8192]

    response = await cluster.gateway.post(path, content=pieces() if chunked else raw,
                                          headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert f"larger than {MAX_BODY_BYTES} bytes" in error["message"]
    assert error["type"] == ("invalid_request_error" if path.startswith("/v1") else "request_too_large")
    assert all(not fake.requests for fake in cluster.workers.values())
