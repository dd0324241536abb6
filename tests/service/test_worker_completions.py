"""POST /completions on the worker app in-process: stateless chats that resend their history reuse
their earlier turns' KV, conversations share a system prompt, stop strings, the same stream and
error formats as /generate, draining, metrics and client disconnects. Outputs are compared with
a worker that has KV reuse off."""

import asyncio
import threading

import httpx
import pytest
import pytest_asyncio

from services.common.schemas import GenerateResult
from services.common.sse import parse_events
from services.worker.engine.sequence import SamplingParams, Status
from services.worker.kv.prefix_index import BLOCK_TOKENS
from services.worker.streams import RequestHandle, start_request, stream_events
from tests.service.test_worker_api import WAIT_S, assert_error, running_app, wait_for, worker_settings
from tests.unit.test_engine import Gate

pytestmark = pytest.mark.asyncio(loop_scope="module")

SYSTEM = ("You are a careful assistant for a distributed KV-cache serving system. Answer briefly, "
          "cite the configuration setting by name, and never invent a setting that does not exist. ") * 2


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(tiny_model_cache_dir):
    async with running_app(worker_settings(tiny_model_cache_dir, worker_id="w-cached")) as (app, client):
        yield app, client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fresh(tiny_model_cache_dir):
    """A worker that recomputes everything."""
    settings = worker_settings(tiny_model_cache_dir, worker_id="w-fresh", enable_kv_reuse=False)
    async with running_app(settings) as (_, client):
        yield client


@pytest.fixture
def client(worker):
    return worker[1]


async def complete(client: httpx.AsyncClient, **body) -> dict:
    """The `done` fields, streamed or not; with stream=true, also checks the event sequence."""
    body = {"max_tokens": 12, "temperature": 0, **body}
    response = await client.post("/completions", json=body)
    assert response.status_code == 200, response.text
    if not body.get("stream", True):
        return GenerateResult.model_validate(response.json()).model_dump()
    events = list(parse_events(response.text.splitlines()))
    types = [e["type"] for e in events]
    assert types[0] == "start" and types[-1] == "done" and set(types[1:-1]) == {"token"}, types
    start, done = events[0], events[-1]
    assert start["cached_tokens"] == done["usage"]["cached_tokens"]
    assert start["context_tokens"] == done["usage"]["context_tokens"] == done["usage"]["prompt_tokens"]
    assert start["handoff_tokens"] == done["usage"]["handoff_tokens"] == 0
    assert "".join(e["token"] for e in events[1:-1]) == done["text"]
    return {**{k: v for k, v in done.items() if k != "type"}, "pieces": [e["token"] for e in events[1:-1]]}


async def test_a_six_turn_chat_reuses_its_history_and_matches_recompute(client, fresh):
    messages = [{"role": "system", "content": SYSTEM}]
    previous = None
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question {turn}: which setting bounds the KV cache?"})
        stream = turn % 2 == 1
        cached = await complete(client, messages=messages, stream=stream)
        expected = await complete(fresh, messages=messages, stream=stream)
        assert cached["text"] == expected["text"], turn
        usage = cached["usage"]
        assert usage["prompt_tokens"] == expected["usage"]["prompt_tokens"]
        assert expected["usage"]["cached_tokens"] == 0
        if previous is not None:
            assert usage["cached_tokens"] >= previous["prompt_tokens"] + previous["completion_tokens"] - BLOCK_TOKENS
            assert usage["cached_tokens"] < usage["prompt_tokens"]
        previous = usage
        messages.append({"role": "assistant", "content": cached["text"]})


async def test_a_shared_system_prompt_is_copied_into_another_conversation(client, fresh):
    system = [{"role": "system", "content": "Shared: " + SYSTEM}]
    await complete(client, messages=system + [{"role": "user", "content": "How do I scale out?"}], stream=False)
    second = system + [{"role": "user", "content": "What does a drain do?"}]
    result = await complete(client, messages=second, stream=False)
    rendered_system = len(f"<|system|>\nShared: {SYSTEM}<|end|>\n")  # byte-level: a token per character
    assert result["usage"]["cached_tokens"] >= rendered_system - BLOCK_TOKENS
    assert result["usage"]["cached_tokens"] < result["usage"]["prompt_tokens"] - len("What does a drain do?")
    assert result["text"] == (await complete(fresh, messages=second, stream=False))["text"]


async def test_stop_strings(client):
    prompt = "Stop strings: " + SYSTEM
    full = (await complete(client, prompt=prompt, max_tokens=24))["text"]
    stop = full[8:11]
    assert full.index(stop) == 8, "pick a stop string that first occurs at position 8"
    for stream in (True, False):
        result = await complete(client, prompt=prompt, max_tokens=24, stop=[stop, "never-there"], stream=stream)
        assert result["finish_reason"] == "stop"
        assert result["text"] == full[:8]
        assert all(stop not in piece for piece in result.get("pieces", []))
    assert (await complete(client, prompt=prompt, max_tokens=24, stop=["never-there"]))["finish_reason"] == "length"


async def test_a_raw_prompt_returns_the_generate_result(client):
    response = await client.post("/completions", json={"prompt": "Hello there", "max_tokens": 5, "temperature": 0,
                                                       "stream": False, "request_id": "req-1"})
    assert response.status_code == 200
    result = GenerateResult.model_validate(response.json())
    assert result.seq_id == "req-1" and result.worker_id == "w-cached"
    assert result.usage.model_dump() == {"prompt_tokens": 11, "cached_tokens": 0, "handoff_tokens": 0, "tier_tokens": 0,
                                         "completion_tokens": 5, "context_tokens": 11}
    assert result.finish_reason == "length"
    generated = await client.post("/generate", json={"prompt": "Hello there", "max_tokens": 5, "temperature": 0,
                                                     "stream": False})
    assert generated.json()["text"] == result.text  # the same model, the same greedy output


@pytest.mark.parametrize("stream", [True, False])
async def test_context_too_long_is_400(client, stream):
    response = await client.post("/completions", json={"prompt": "x" * 1000, "max_tokens": 100, "stream": stream})
    assert_error(response, 400, "context_too_long")


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
    {"max_tokens": 3},
    {"prompt": "hi", "stop": [""]},
    {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": []},
    {"prompt": "hi", "seq_id": "s"},
])
async def test_bad_bodies_are_422(client, body):
    assert_error(await client.post("/completions", json=body), 422, "invalid_request")


async def test_stats_and_metrics_count_prefix_cache_tokens(client):
    prompt = "Counters: " + SYSTEM
    before = (await client.get("/stats")).json()
    await complete(client, prompt=prompt, max_tokens=2)
    again = await complete(client, prompt=prompt, max_tokens=2)
    stats = (await client.get("/stats")).json()
    assert stats["prefix_cache_queries"] - before["prefix_cache_queries"] == 2 * len(prompt)
    assert stats["prefix_cache_hits"] - before["prefix_cache_hits"] == again["usage"]["cached_tokens"] == len(prompt) - 1
    text = (await client.get("/metrics")).text
    assert f"kvcache_worker_prefix_cache_queries_total {float(stats['prefix_cache_queries'])}" in text
    assert f"kvcache_worker_prefix_cache_hits_total {float(stats['prefix_cache_hits'])}" in text
    assert 'kvcache_worker_completion_requests_total{outcome="accepted"}' in text
    assert "kvcache_worker_stateless_sequences " in text


async def test_completions_are_timed_and_their_tokens_counted(worker):
    """Streamed or not, each request is one sample of the request histograms; its prompt is all
    looked up in the prefix cache (prompt_tokens moves with prefix_cache_queries)."""
    app, client = worker
    registry = app.state.worker.metrics.registry
    names = ("time_to_first_token_seconds_count", "e2e_request_latency_seconds_count",
             "request_queue_time_seconds_count", "prompt_tokens_total", "prefix_cache_queries_total",
             "generation_tokens_total")

    def values() -> dict[str, float]:
        return {n: registry.get_sample_value(f"kvcache_worker_{n}") or 0.0 for n in names}

    before = values()
    results = [await complete(client, prompt="Timed completion", max_tokens=3, stream=stream)
               for stream in (True, False)]
    delta = {n: v - before[n] for n, v in values().items()}
    assert delta["time_to_first_token_seconds_count"] == delta["e2e_request_latency_seconds_count"] == 2
    assert delta["request_queue_time_seconds_count"] == 2
    assert delta["prompt_tokens_total"] == delta["prefix_cache_queries_total"] == \
        sum(r["usage"]["prompt_tokens"] for r in results)
    assert delta["generation_tokens_total"] == sum(r["usage"]["completion_tokens"] for r in results)


async def test_closing_the_stream_aborts_the_request(worker):
    """A client disconnect closes the SSE generator, which aborts the request in the engine."""
    app, client = worker
    engine = app.state.worker.engine
    await wait_for(lambda: engine.stats()["running"] == 0, "an idle engine")
    with Gate(engine, hold_at=3) as gate:  # in its 3rd forward, the request is surely running
        handle = RequestHandle.stateless(engine, "disc", engine.encode("disconnect me " * 4),
                                         SamplingParams(max_tokens=500, temperature=0))
        events = stream_events(handle, await start_request(handle))
        assert b'"start"' in await events.__anext__()
        assert b'"token"' in await events.__anext__()
        await asyncio.to_thread(gate.wait_reached)
        await events.aclose()  # the client went away
        gate.released.set()
        await wait_for(lambda: handle.request.status is Status.FINISHED, "the abort")
        assert len(handle.request.generated) == 3  # the step in flight, then nothing
    # What it computed stays cached: the same prompt finds it.
    again = await complete(client, prompt="disconnect me " * 4, max_tokens=2)
    assert again["usage"]["cached_tokens"] == len("disconnect me " * 4) - 1


async def test_refused_while_draining_or_loading(tiny_model_cache_dir):
    async with running_app(worker_settings(tiny_model_cache_dir, worker_id="w-drain")) as (app, client):
        app.state.worker.start_drain()
        response = await client.post("/completions", json={"prompt": "hi"})
        assert_error(response, 503, "draining")
    unloaded = running_app(worker_settings(tiny_model_cache_dir), ready=False).app  # lifespan not run
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=unloaded), base_url="http://w") as client:
        assert_error(await client.post("/completions", json={"prompt": "hi"}), 503, "worker_not_ready")


# --- vLLM's sampling parameters, logprobs and n over HTTP (the engine tests compare each with transformers) ---
async def test_sampling_parameters_reach_the_engine(client):
    prompt = "The quick brown fox jumps over the lazy dog. "
    plain = await complete(client, prompt=prompt, max_tokens=16)
    penalized = await complete(client, prompt=prompt, max_tokens=16, repetition_penalty=1.8,
                               presence_penalty=1.5, frequency_penalty=0.5)
    assert penalized["text"] != plain["text"]
    top1 = await complete(client, prompt=prompt, max_tokens=16, temperature=1.0, top_k=1, seed=4, stream=False)
    assert top1["text"] == plain["text"]  # top_k 1 is greedy at any temperature
    kept = await complete(client, prompt=prompt, max_tokens=16, stop=[plain["text"][3:5]],
                          include_stop_str_in_output=True, ignore_eos=True, min_tokens=1,
                          skip_special_tokens=False, spaces_between_special_tokens=False)
    assert kept["text"] == plain["text"][:5] and kept["finish_reason"] == "stop"


async def test_logprobs_and_prompt_logprobs_in_the_stream_and_the_result(client):
    body = {"prompt": "Hello there, general", "max_tokens": 4, "temperature": 0, "logprobs": 2, "prompt_logprobs": 1}
    result = (await client.post("/completions", json=body | {"stream": False})).json()
    assert [len(e["top_logprobs"]) for e in result["logprobs"]] == [2] * 4
    assert result["prompt_logprobs"][0]["logprob"] is None and len(result["prompt_logprobs"]) == len(body["prompt"])
    events = list(parse_events((await client.post("/completions", json=body)).text.splitlines()))
    tokens = [e for e in events if e["type"] == "token"]
    assert [e["logprobs"] for e in tokens] == result["logprobs"]
    assert tokens[0]["prompt_logprobs"] == result["prompt_logprobs"]


async def test_n_choices_share_the_prompt_and_end_in_one_done(client):
    body = {"prompt": SYSTEM, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3}
    result = (await client.post("/completions", json=body | {"stream": False})).json()
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert [c["usage"]["cached_tokens"] for c in result["choices"]][1:] == [result["usage"]["prompt_tokens"] - 1] * 2
    assert result["usage"]["completion_tokens"] == sum(c["usage"]["completion_tokens"] for c in result["choices"])
    events = list(parse_events((await client.post("/completions", json=body)).text.splitlines()))
    assert [e["type"] for e in events].count("start") == 1 and events[-1]["type"] == "done"
    for i, choice in enumerate(events[-1]["choices"]):
        assert "".join(e["token"] for e in events if e.get("choice") == i and e["type"] == "token") == choice["text"]
        assert choice["text"] == result["choices"][i]["text"]  # seeded: seed + i for choice i


@pytest.mark.parametrize("body, param", [({"stop_token_ids": [10**6]}, "stop_token_ids"),
                                         ({"min_tokens": 20, "max_tokens": 4}, "min_tokens"),
                                         ({"logprobs": 21}, "logprobs"), ({"n": 17}, "n"),
                                         ({"top_k": -2}, "top_k"), ({"presence_penalty": 2.5}, "presence_penalty")])
async def test_out_of_range_sampling_parameters_are_400s(client, body, param):
    response = await client.post("/completions", json={"prompt": "hi", "max_tokens": 4, **body})
    assert response.status_code in (400, 422), response.text
    if param is not None:
        assert param in response.text


async def test_n_choices_refused_part_way_leave_nothing_running(tiny_model_cache_dir):
    """While the engine is inside a forward (nothing leaves its inbox), the third choice finds the
    waiting queue full: the request is a 429 and the choices already submitted are aborted."""
    settings = worker_settings(tiny_model_cache_dir, max_waiting_requests=2, worker_id="w-n-full")
    async with running_app(settings) as (app, client):
        engine = app.state.worker.engine
        gate, reached = threading.Event(), threading.Event()
        forward = engine.runner.forward

        def gated(inputs):
            reached.set()
            gate.wait(WAIT_S)
            return forward(inputs)

        engine.runner.forward = gated
        try:
            first = asyncio.create_task(client.post("/completions", json={"prompt": "one", "max_tokens": 3,
                                                                           "stream": False}))
            assert await asyncio.to_thread(reached.wait, WAIT_S)
            response = await client.post("/completions", json={"prompt": "hello", "max_tokens": 50, "n": 3})
            assert_error(response, 429, "overloaded")
        finally:
            engine.runner.forward = forward
            gate.set()
        assert (await first).status_code == 200
        await wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, "an idle engine")
        assert engine.stats()["aborted"] == 2 and engine.stats()["generated_tokens"] == 3
