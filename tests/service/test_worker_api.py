"""The worker app in-process: lifespan (model load off the loop, engine thread), routes,
stream format, validation and error bodies. httpx's ASGITransport buffers whole responses,
which is fine for complete streams."""

import asyncio
import json
import re
import tempfile
import threading
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import torch

from services.common.schemas import GenerateResult
from services.common.sse import parse_events
from services.worker.api import _stream
from services.worker.app import create_app
from services.worker.engine.sequence import SamplingParams, Status
from services.worker.settings import WorkerSettings
from services.worker.streams import RequestHandle
from tests.conformance.architectures import REFUSED, build
from tests.unit.test_engine import Gate

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_S = 30.0
KV_BYTES = 16 * 2**20


def worker_settings(cache_dir, **overrides) -> WorkerSettings:
    run_dir = Path(tempfile.mkdtemp(prefix="kvcache-worker-"))  # a fresh store and KV tiers per app
    values = dict(register_with_coordinator=False, model_name="tiny-gpt2", model_cache_dir=cache_dir,
                  device="cpu", dtype="float32", kv_cache_bytes=KV_BYTES, worker_id="w-api",
                  port=18082, max_batch_size=8, session_store_url=f"sqlite:///{run_dir / 'sessions.db'}",
                  kv_disk_dir=str(run_dir / "kv-disk"), kv_shared_url=str(run_dir / "kv-shared"))
    return WorkerSettings(**{**values, **overrides})


async def wait_ready(client: httpx.AsyncClient) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (await client.get("/ready")).status_code != 200:
        assert loop.time() < deadline, "worker not ready in time"
        await asyncio.sleep(0.02)


async def wait_for(predicate, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class running_app:
    """Runs the app's lifespan and yields a client once /ready answers 200."""

    def __init__(self, settings: WorkerSettings, ready: bool = True):
        self.app = create_app(settings)
        self.ready = ready

    async def __aenter__(self) -> tuple:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self._client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                         base_url="http://worker", timeout=WAIT_S)
        if self.ready:
            await wait_ready(self._client)
        return self.app, self._client

    async def __aexit__(self, *exc) -> None:
        await self._client.aclose()
        await self._lifespan.__aexit__(*exc)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(tiny_model_cache_dir):
    async with running_app(worker_settings(tiny_model_cache_dir)) as (app, client):
        yield app, client


@pytest.fixture
def client(worker):
    return worker[1]


@pytest.fixture
def engine(worker):
    return worker[0].state.worker.engine


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    return error


async def stream(client, **body) -> tuple[httpx.Response, list[dict]]:
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return response, list(parse_events(response.text.splitlines()))


def tokens_of(events: list[dict]) -> list[int]:
    return [e["token_id"] for e in events if e["type"] == "token"]


# --- streaming -----------------------------------------------------------------------------
async def test_stream_event_order_and_fields(client):
    response, events = await stream(client, prompt="Hello there", seq_id="api-order", max_tokens=6,
                                    temperature=0)
    assert response.headers["x-seq-id"] == "api-order"
    start, tokens, done = events[0], events[1:-1], events[-1]
    assert start == {"type": "start", "seq_id": "api-order", "worker_id": "w-api", "prompt": "Hello there",
                     "context_tokens": 11, "cached_tokens": 0, "handoff_tokens": 0, "tier_tokens": 0}
    assert [e["type"] for e in tokens] == ["token"] * 6
    assert [e["index"] for e in tokens] == list(range(6))
    assert all(set(e) == {"type", "index", "token", "token_id"} for e in tokens)
    assert [e["type"] for e in events].count("done") == 1 and done["type"] == "done"
    result = GenerateResult.model_validate({k: v for k, v in done.items() if k != "type"})
    assert result.seq_id == "api-order" and result.worker_id == "w-api"
    assert result.finish_reason == "length"
    assert result.usage.model_dump() == {"prompt_tokens": 11, "cached_tokens": 0, "handoff_tokens": 0, "tier_tokens": 0,
                                         "completion_tokens": 6, "context_tokens": 11}
    assert result.text == "".join(e["token"] for e in tokens)
    assert (result.generated_text, result.tokens_generated) == (result.text, 6)  # the reference's names


async def test_generate_takes_the_sampling_parameters_and_streams_logprobs(client):
    """The engine tests compare each parameter with transformers; here they reach it from /generate."""
    _, plain = await stream(client, prompt="Hello there", max_tokens=8, temperature=0)
    _, penalized = await stream(client, prompt="Hello there", max_tokens=8, temperature=0, repetition_penalty=2.0,
                                frequency_penalty=1.0, top_k=5, min_p=0.01, ignore_eos=True, min_tokens=2,
                                logprobs=3, skip_special_tokens=False)
    assert tokens_of(penalized) != tokens_of(plain)
    assert all(len(e["logprobs"]["top_logprobs"]) == 3 for e in penalized if e["type"] == "token")
    _, stopped = await stream(client, prompt="Hello there", max_tokens=8, temperature=0,
                              stop_token_ids=[tokens_of(plain)[2]])
    assert tokens_of(stopped) == tokens_of(plain)[:3] and stopped[-1]["finish_reason"] == "stop"
    response = await client.post("/generate", json={"prompt": "hi", "stop_token_ids": [10**6]})
    assert_error(response, 400, "invalid_request")
    response = await client.post("/generate", json={"prompt": "hi", "min_tokens": 60})  # above max_tokens (50)
    assert_error(response, 400, "invalid_request")


async def test_seq_id_is_minted_when_absent(client):
    response, events = await stream(client, prompt="no id", max_tokens=2, temperature=0)
    seq_id = response.headers["x-seq-id"]
    assert re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", seq_id)
    assert events[0]["seq_id"] == seq_id == events[-1]["seq_id"]


async def test_continuation_reports_cached_tokens(client):
    _, first = await stream(client, prompt="First part.", seq_id="api-cont", max_tokens=5, temperature=0)
    _, second = await stream(client, prompt=" Second.", seq_id="api-cont", max_tokens=5, temperature=0)
    earlier = first[0]["context_tokens"] + 5
    # Sent right after `done`: the first turn's last token has KV unless its step ran first
    # (WORKER_TAIL_WAIT_S); the continuation computes it otherwise.
    assert second[0]["cached_tokens"] in (earlier - 1, earlier)
    assert second[0]["context_tokens"] == earlier + len(" Second.")
    assert second[-1]["usage"]["cached_tokens"] == second[0]["cached_tokens"]
    await asyncio.sleep(0.3)  # past the tail wait: the second turn's last token has its KV now
    _, third = await stream(client, prompt=" Third.", seq_id="api-cont", max_tokens=5, temperature=0)
    assert third[0]["cached_tokens"] == second[0]["context_tokens"] + 5

async def test_stream_false_returns_the_done_fields(client):
    _, events = await stream(client, prompt="Same prompt", seq_id="api-s", max_tokens=5, temperature=0)
    response = await client.post("/generate", json={"prompt": "Same prompt", "seq_id": "api-ns",
                                                    "max_tokens": 5, "temperature": 0, "stream": False})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-seq-id"] == "api-ns"
    body = response.json()
    assert "type" not in body
    result = GenerateResult.model_validate(body)
    assert result.seq_id == "api-ns" and result.usage.completion_tokens == 5
    assert result.text == events[-1]["text"]  # greedy: same prompt, same output


async def test_concurrent_streams_all_complete(client):
    results = await asyncio.gather(*(
        stream(client, prompt=f"concurrent {i} " * (i + 1), seq_id=f"api-c{i}", max_tokens=4 + i,
               temperature=0) for i in range(6)))
    for i, (_, events) in enumerate(results):
        assert events[0]["type"] == "start" and events[-1]["type"] == "done"
        assert len(tokens_of(events)) == 4 + i


# --- errors before streaming ---------------------------------------------------------------
async def test_wrong_model_name_is_404(client):
    response = await client.post("/generate", json={"prompt": "hi", "model_name": "gpt2"})
    error = assert_error(response, 404, "model_not_found")
    assert "tiny-gpt2" in error["message"]
    ok = await client.post("/generate", json={"prompt": "hi", "model_name": "tiny-gpt2",
                                              "max_tokens": 1, "stream": False})
    assert ok.status_code == 200


@pytest.mark.parametrize("stream_flag", [True, False])
async def test_context_too_long_is_400(client, stream_flag):
    response = await client.post("/generate", json={"prompt": "x" * 1000, "max_tokens": 100,
                                                    "stream": stream_flag})
    assert_error(response, 400, "context_too_long")


async def test_a_prompt_longer_than_any_tokenization_of_the_window_is_400_untokenized(client, engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "tokenizer", _Counting(engine.tokenizer, calls))
    chars = engine.window * engine.max_token_chars + 1  # no token covers more than max_token_chars
    error = assert_error(await client.post("/generate", json={"prompt": "x" * chars, "max_tokens": 1}),
                         400, "context_too_long")
    assert f"a prompt of {chars} characters" in error["message"]
    chat = {"messages": [{"role": "user", "content": "x" * (chars // 2 + 1)}] * 2, "max_tokens": 1}
    assert_error(await client.post("/completions", json=chat), 400, "context_too_long")
    assert calls == []  # refused before any tokenization
    just_fits = await client.post("/generate", json={"prompt": "x" * (chars - 1), "max_tokens": 1})
    assert_error(just_fits, 400, "context_too_long")  # by the token count this time
    assert calls


class _Counting:
    def __init__(self, tokenizer, calls: list) -> None:
        self._tokenizer, self._calls = tokenizer, calls

    def __getattr__(self, name):
        self._calls.append(name)
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("body", [
    {"prompt": ""},
    {},
    {"prompt": "hi", "seq_id": "has spaces"},
    {"prompt": "hi", "seq_id": ""},
    {"prompt": "hi", "seq_id": "x" * 129},
    {"prompt": "hi", "max_tokens": 0},
    {"prompt": "hi", "max_tokens": 10**6},
    {"prompt": "hi", "temperature": 3},
    {"prompt": "hi", "temperature": -0.1},
    {"prompt": "hi", "top_p": 0},
    {"prompt": "hi", "top_p": 1.5},
    {"prompt": "hi", "seed": -1},
    {"prompt": "hi", "unknown": 1},
    {"prompt": 5},
    {"prompt": "hi", "top_k": -2},
    {"prompt": "hi", "min_p": 1.5},
    {"prompt": "hi", "repetition_penalty": 0},
    {"prompt": "hi", "frequency_penalty": -2.5},
    {"prompt": "hi", "logprobs": 21},
    {"prompt": "hi", "ignore_eos": "yes"},
    {"prompt": "hi", "prompt_logprobs": 1},  # stateless requests only
])
async def test_bad_bodies_are_422(client, body):
    assert_error(await client.post("/generate", json=body), 422, "invalid_request")


async def test_malformed_json_is_422(client):
    response = await client.post("/generate", content=b"{not json",
                                 headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


# --- sequences, stats, health, metrics -------------------------------------------------------
async def test_delete_sequence(client, engine):
    await stream(client, prompt="to delete", seq_id="api-del", max_tokens=3, temperature=0)
    await wait_for(lambda: not engine.store.get("api-del").busy, "the request to finish")
    response = await client.delete("/sequences/api-del")
    assert response.status_code == 200 and response.json() == {"seq_id": "api-del", "deleted": True}
    assert_error(await client.delete("/sequences/api-del"), 404, "not_found")
    assert_error(await client.delete("/sequences/never-seen"), 404, "not_found")
    assert_error(await client.delete("/sequences/bad%20id"), 400, "invalid_request")
    _, events = await stream(client, prompt="again", seq_id="api-del", max_tokens=2, temperature=0)
    assert events[0]["cached_tokens"] == 0 and events[0]["context_tokens"] == 5


async def test_stats(client):
    await stream(client, prompt="stats", seq_id="api-stats", max_tokens=2, temperature=0)
    stats = (await client.get("/stats")).json()
    assert stats["worker_id"] == "w-api" and stats["model_name"] == "tiny-gpt2"
    assert stats["ready"] is True and stats["enable_kv_reuse"] is True
    assert stats["kv_bytes_limit"] == KV_BYTES
    assert 0 < stats["kv_bytes_used"] <= stats["kv_bytes_peak"] <= KV_BYTES
    assert stats["kv_bytes_per_token"] == 4 * 2 * 128 * 4  # tiny-gpt2: 4 layers, 128 wide, fp32
    for key in ("sequences", "cached_sequences", "cached_tokens", "hits", "misses", "evictions",
                "requests", "new_sequences", "prefill_tokens", "reused_tokens", "generated_tokens",
                "steps", "aborted", "rejected", "running", "waiting"):
        assert isinstance(stats[key], int), key
    assert stats["requests"] >= 1 and stats["generated_tokens"] >= 2 and stats["sequences"] >= 1


async def test_health_and_ready(client):
    assert (await client.get("/health")).json() == {"status": "ok"}
    response = await client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "worker_id": "w-api"}


async def test_metrics(client):
    await stream(client, prompt="metrics", max_tokens=2, temperature=0)
    response = await client.get("/metrics")
    assert response.status_code == 200
    text = response.text
    for name in ("kvcache_worker_generate_requests_total", "kvcache_worker_time_to_first_token_seconds_bucket",
                 "kvcache_worker_kv_bytes_used", "kvcache_worker_kv_bytes_limit",
                 "kvcache_worker_requests_total", "kvcache_worker_prefill_tokens_total",
                 "kvcache_worker_evictions_total", "kvcache_worker_num_requests_running",
                 "kvcache_worker_num_requests_waiting", "kvcache_worker_kv_cache_usage_perc"):
        assert name in text, name
    assert 'kvcache_worker_generate_requests_total{outcome="accepted"}' in text
    assert 'kvcache_worker_generate_requests_total{outcome="overloaded"} 0.0' in text  # exported before any
    assert 'kvcache_worker_session_store_latency_seconds_count{op="renew"}' in text


async def test_a_request_is_timed_and_its_tokens_counted(worker, engine):
    """One request: one sample in each request histogram (equal to the done event's timings), one
    inter-token latency per gap, the token counters move by its usage, and each session-store call
    is timed."""
    app, client = worker
    registry = app.state.worker.metrics.registry
    await wait_for(lambda: engine.stats()["running"] == 0, "an idle engine")

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(f"kvcache_worker_{name}", labels) or 0.0

    names = [f"{h}_{s}" for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                                  "request_queue_time_seconds", "request_prefill_time_seconds",
                                  "request_decode_time_seconds", "inter_token_latency_seconds")
             for s in ("count", "sum")] + ["prompt_tokens_total", "generation_tokens_total"]
    ops = ("load", "begin_turn", "end_turn")
    before = {n: value(n) for n in names} | {op: value("session_store_latency_seconds_count", op=op) for op in ops}
    _, events = await stream(client, prompt="time me", seq_id="api-timed", max_tokens=5, temperature=0)
    after = {n: value(n) for n in names} | {op: value("session_store_latency_seconds_count", op=op) for op in ops}
    delta = {n: after[n] - before[n] for n in after}
    done = events[-1]
    usage, timings = done["usage"], done["timings"]
    for histogram in names[:10:2]:
        assert delta[histogram] == 1, histogram
    assert delta["inter_token_latency_seconds_count"] == usage["completion_tokens"] - 1
    assert delta["time_to_first_token_seconds_sum"] == pytest.approx(timings["ttft_ms"] / 1000)
    assert delta["request_prefill_time_seconds_sum"] == pytest.approx(timings["prefill_ms"] / 1000)
    assert delta["request_decode_time_seconds_sum"] == pytest.approx(timings["decode_ms"] / 1000)
    assert delta["request_decode_time_seconds_sum"] == pytest.approx(delta["inter_token_latency_seconds_sum"])
    assert delta["e2e_request_latency_seconds_sum"] == pytest.approx(
        delta["time_to_first_token_seconds_sum"] + delta["request_decode_time_seconds_sum"])
    assert delta["prompt_tokens_total"] == usage["context_tokens"]
    assert delta["generation_tokens_total"] == usage["completion_tokens"]
    assert all(delta[op] == 1 for op in ops), delta


async def test_threads_beside_the_engine_run_torch_ops_alone(worker):
    """asyncio.to_thread's threads (prefetches, handoff imports, tokenizing) run their torch ops on
    themselves: a thread team beside the engine's slows its forwards (services/worker/cpu_threads.py)."""
    assert await asyncio.to_thread(torch.get_num_threads) == 1


# --- client disconnect -------------------------------------------------------------------------
async def test_closing_the_stream_aborts_the_request(worker, engine):
    """What a client disconnect does: the event stream closes the event generator, whose `finally`
    aborts the request; the engine drops it at its next step."""
    app, client = worker
    # Earlier tests' last step (writing the final token's KV) may still be due: let it run first.
    await wait_for(lambda: engine.stats()["running"] == 0, "an idle engine")
    with Gate(engine, hold_at=3) as gate:  # in its 3rd forward, the request is surely running
        state = app.state.worker
        turn = await state.turns.begin("api-disc", "turn-disc", engine.encode("disconnect me"),
                                       max_tokens=500, window=engine.window)
        handle = RequestHandle.for_turn(engine, turn, SamplingParams(max_tokens=500, temperature=0))
        await handle.submit()
        start = await handle.first_event()
        events = _stream(state, turn, handle, start)
        assert b'"start"' in await events.__anext__()
        assert b'"token"' in await events.__anext__()
        await asyncio.to_thread(gate.wait_reached)
        await events.aclose()  # the client went away
        kept = len(handle.generated_ids)  # what the engine had generated: into the session store
        assert kept == 2 and not state.turns.is_open(turn)
        gate.released.set()
        await wait_for(lambda: handle.request.status is Status.FINISHED, "the abort")
        assert len(handle.request.generated) == 3  # the step in flight, then nothing
    assert engine.stats()["aborted"] >= 1
    _, events = await stream(client, prompt=" back", seq_id="api-disc", max_tokens=2,
                             temperature=0)
    assert events[0]["context_tokens"] == len("disconnect me") + kept + len(" back")


# --- other app states --------------------------------------------------------------------------
async def test_before_the_model_is_loaded(tiny_model_cache_dir):
    app = create_app(worker_settings(tiny_model_cache_dir))  # lifespan not run: nothing loaded
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://w") as client:
        ready = await client.get("/ready")
        assert_error(ready, 503, "worker_not_ready")
        assert ready.headers["retry-after"] == "2"
        response = await client.post("/generate", json={"prompt": "hi"})
        assert_error(response, 503, "worker_not_ready")
        assert int(response.headers["retry-after"]) > 0
        assert_error(await client.delete("/sequences/abc"), 503, "worker_not_ready")
        assert (await client.get("/health")).status_code == 200
        stats = await client.get("/stats")
        assert stats.status_code == 200 and stats.json()["ready"] is False
        assert (await client.get("/metrics")).status_code == 200


async def test_failed_model_load(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    settings = worker_settings(tmp_path, model_name=str(empty))
    async with running_app(settings, ready=False) as (app, client):
        await wait_for(lambda: app.state.worker.load_error is not None, "the load to fail")
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        ready = await client.get("/ready")
        assert_error(ready, 503, "worker_not_ready")
        assert "retry-after" not in ready.headers  # it will not get better by waiting


async def test_a_model_the_engine_cannot_honour_keeps_the_worker_not_ready(tmp_path):
    arch = next(a for a in REFUSED if a.name == "bloom")
    settings = worker_settings(tmp_path, model_name=str(build(arch, tmp_path / "bloom")))
    async with running_app(settings, ready=False) as (app, client):
        await wait_for(lambda: app.state.worker.load_error is not None, "the model to be refused")
        ready = await client.get("/ready")
        error = assert_error(ready, 503, "worker_not_ready")
        assert "model type 'bloom' is not supported: the attention of layer(s) [0, 1] never reaches" \
            in error["message"]
        response = await client.post("/generate", json={"prompt": "hi"})
        assert_error(response, 503, "worker_not_ready")


async def test_with_an_internal_token_every_route_that_changes_or_reads_a_sequence_needs_it(tiny_model_cache_dir):
    """Turns, stateless completions, outcome lookups and deletes: only the gateway (a holder of the
    token) may call them; the worker would also send its token to the handoff sources named."""
    settings = worker_settings(tiny_model_cache_dir, internal_token="worker-token", worker_id="w-token")
    token = {"Authorization": "Bearer worker-token"}
    sources = [{"worker_id": "w-gone", "address": "http://127.0.0.1:9"}]  # nothing listens there
    turn = {"prompt": "hi", "seq_id": "tok", "max_tokens": 2, "temperature": 0, "stream": False}
    async with running_app(settings) as (app, client):
        calls = [("POST", "/generate", turn), ("POST", "/generate", {**turn, "handoff_sources": sources}),
                 ("POST", "/generate", {**turn, "resume": {"turn_id": "t", "generated_ids": [1]}}),
                 ("POST", "/completions", {"prompt": "hi", "max_tokens": 1}),
                 ("GET", "/sequences/tok", None), ("DELETE", "/sequences/tok", None)]
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer nope"}):
                refused = await client.request(method, path, json=body, headers=headers)
                assert_error(refused, 401, "unauthorized")
        assert app.state.worker.engine.stats()["requests"] == 0
        assert (await client.post("/generate", json=turn, headers=token)).status_code == 200
        with_token = await client.post("/generate", json={**turn, "handoff_sources": sources}, headers=token)
        assert with_token.status_code == 200, with_token.text
        assert with_token.json()["usage"]["context_tokens"] == 2 + 2 + 2  # both turns kept, none refused
        assert (await client.get("/sequences/tok", headers=token)).json()["history_tokens"] == 8
        engine = app.state.worker.engine
        await wait_for(lambda: engine.stats()["running"] == 0, "the turn's last step")  # else 409
        assert (await client.delete("/sequences/tok", headers=token)).status_code == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_413_before_it_is_read(tiny_model_cache_dir, chunked):
    settings = worker_settings(tiny_model_cache_dir, max_body_bytes=64 * 1024, worker_id="w-limit")
    raw = json.dumps({"prompt": "x" * 100_000, "max_tokens": 1}).encode()

    async def pieces():
        for i in range(0, len(raw), 8192):
            yield raw[i:i + 8192]

    async with running_app(settings) as (app, client):
        response = await client.post("/generate", content=pieces() if chunked else raw,
                                     headers={"content-type": "application/json"})
        error = assert_error(response, 413, "request_too_large")
        assert "larger than 65536 bytes" in error["message"]
        assert app.state.worker.engine.stats()["requests"] == 0


async def test_a_body_that_stalls_is_408(tiny_model_cache_dir):
    """Before any route: no lifespan (no model) is needed."""
    app = create_app(worker_settings(tiny_model_cache_dir, body_timeout_s=0.2, worker_id="w-slow-body"))
    messages = [{"type": "http.request", "body": b'{"prompt": "a', "more_body": True}]
    sent: list[dict] = []

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()  # the client sends no more

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/generate", "raw_path": b"/generate", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 18082)}
    await asyncio.wait_for(app(scope, receive, send), WAIT_S)
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"]["type"] == "request_timeout"


async def test_overloaded_is_429_and_too_large_is_503(tiny_model_cache_dir):
    bpt = 4 * 2 * 128 * 4
    settings = worker_settings(tiny_model_cache_dir, max_waiting_requests=1, kv_cache_bytes=128 * bpt,
                               worker_id="w-small")
    async with running_app(settings) as (app, client):
        engine = app.state.worker.engine
        too_large = await client.post("/generate", json={"prompt": "x" * 100, "max_tokens": 100})
        assert_error(too_large, 503, "unavailable")

        gate, reached = threading.Event(), threading.Event()
        forward = engine.runner.forward

        def gated(inputs):
            reached.set()
            gate.wait(WAIT_S)
            return forward(inputs)

        engine.runner.forward = gated
        try:
            body = {"prompt": "one", "max_tokens": 3, "temperature": 0, "stream": False}
            first = asyncio.create_task(client.post("/generate", json=body))
            assert await asyncio.to_thread(reached.wait, WAIT_S)  # the engine is inside a forward
            second = asyncio.create_task(client.post("/generate", json={**body, "prompt": "two"}))
            await wait_for(lambda: engine.stats()["waiting"] == 1 or second.done(),
                           "a queued request")
            assert not second.done(), (second.result().status_code, second.result().text, engine.stats())
            third = await client.post("/generate", json={**body, "prompt": "three"})
            assert_error(third, 429, "overloaded")
            assert int(third.headers["retry-after"]) > 0
        finally:
            engine.runner.forward = forward
            gate.set()
        assert (await first).status_code == 200 and (await second).status_code == 200
