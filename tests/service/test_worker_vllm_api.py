"""The worker's routes for vLLM's and the reference implementation's clients, in-process: served
model names, /tokenize and /detokenize, the prefix-cache reset, /inference/model/info."""

import pytest
import pytest_asyncio

from services.common.sse import parse_events
from services.worker.chat_template import chat_prompt_ids
from tests.service.test_worker_api import KV_BYTES, assert_error, running_app, worker_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(tiny_model_cache_dir):
    settings = worker_settings(tiny_model_cache_dir, worker_id="w-vllm", served_model_name="gpt2, tiny-gpt2")
    async with running_app(settings) as (app, client):
        yield app, client


@pytest.fixture
def client(worker):
    return worker[1]


@pytest.fixture
def engine(worker):
    return worker[0].state.worker.engine


async def test_any_served_name_is_accepted(client):
    for name in ("gpt2", "tiny-gpt2", None):
        response = await client.post("/generate", json={"prompt": "hi", "model_name": name, "max_tokens": 1,
                                                        "stream": False})
        assert response.status_code == 200, (name, response.text)
    error = assert_error(await client.post("/generate", json={"prompt": "hi", "model_name": "gpt2-xl"}),
                         404, "model_not_found")
    assert "'gpt2', 'tiny-gpt2'" in error["message"]


async def test_start_event_carries_the_prompt(client):
    response = await client.post("/generate", json={"prompt": "Once upon a time", "max_tokens": 2})
    start = next(parse_events(response.text.splitlines()))
    assert start["type"] == "start" and start["prompt"] == "Once upon a time"


async def test_tokenize_a_prompt(client, engine):
    body = (await client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})).json()
    expected = engine.tokenizer.encode("Hello world")
    assert body == {"count": len(expected), "max_model_len": engine.window, "tokens": expected,
                    "token_strs": engine.tokenizer.convert_ids_to_tokens(expected)}
    plain = (await client.post("/tokenize", json={"prompt": "Hello world", "model": "gpt2"})).json()
    assert plain["tokens"] == expected and plain["token_strs"] is None
    bare = (await client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False})).json()
    assert bare["tokens"] == engine.tokenizer.encode("Hello world", add_special_tokens=False)


async def test_tokenize_messages_as_generation_renders_them(client, engine):
    body = (await client.post("/tokenize", json={"messages": CHAT})).json()
    assert body["tokens"] == chat_prompt_ids(engine.tokenizer, CHAT)
    without = (await client.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})).json()
    assert without["tokens"] == chat_prompt_ids(engine.tokenizer, CHAT, add_generation_prompt=False)
    assert without["count"] < body["count"]
    # the same ids a stateless chat request counts as its prompt
    done = (await client.post("/completions", json={"messages": CHAT, "max_tokens": 1, "stream": False})).json()
    assert done["usage"]["prompt_tokens"] == body["count"]


async def test_detokenize_round_trips(client, engine):
    tokens = engine.tokenizer.encode("The quick brown fox")
    body = (await client.post("/detokenize", json={"tokens": tokens})).json()
    assert body == {"prompt": "The quick brown fox"}


@pytest.mark.parametrize("path, body, status", [
    ("/tokenize", {"prompt": "hi", "messages": CHAT}, 422),
    ("/tokenize", {}, 422),
    ("/tokenize", {"prompt": "hi", "extra": 1}, 422),
    ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, 422),
    ("/tokenize", {"prompt": "hi", "add_generation_prompt": False}, 422),
    ("/detokenize", {"tokens": [1, -1]}, 422),
    ("/detokenize", {"tokens": ["1"]}, 422),
    ("/detokenize", {"tokens": [10**9]}, 400),
])
async def test_bad_tokenizer_requests_are_4xx(client, path, body, status):
    assert_error(await client.post(path, json=body), status, "invalid_request")


async def test_reset_prefix_cache_keeps_conversations(client, engine):
    prompt = {"prompt": "A shared prefix that is long enough to fill a cache block or two. " * 2,
              "max_tokens": 2, "temperature": 0, "stream": False}
    first = (await client.post("/completions", json=prompt)).json()
    again = (await client.post("/completions", json=prompt)).json()
    assert first["usage"]["cached_tokens"] == 0 and again["usage"]["cached_tokens"] > 0
    await client.post("/generate", json={"prompt": "a conversation", "seq_id": "keep-me", "max_tokens": 2})
    stats = (await client.get("/stats")).json()
    assert stats["stateless_sequences"] >= 1

    reset = await client.post("/internal/reset_prefix_cache")
    assert reset.status_code == 200
    body = reset.json()
    assert body["worker_id"] == "w-vllm" and body["running_entries"] == 0
    assert body["dropped_entries"] == stats["stateless_sequences"] and body["freed_bytes"] > 0
    assert (await client.get("/stats")).json()["stateless_sequences"] == 0
    assert engine.cached_prefix("keep-me", engine.store.get("keep-me").token_ids) > 0  # kept
    after = (await client.post("/completions", json=prompt)).json()
    assert after["usage"]["cached_tokens"] == 0 and after["text"] == first["text"]


async def test_model_info(client, engine):
    body = (await client.get("/inference/model/info")).json()
    assert body["loaded"] is True and body["worker_id"] == "w-vllm"
    info, kv = body["model_info"], body["kv_cache"]
    layout = engine.store.layout
    assert info == {"model_name": "tiny-gpt2", "served_model_names": ["gpt2", "tiny-gpt2"],
                    "architecture": "GPT2LMHeadModel", "num_layers": layout.num_layers,
                    "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim, "device": "cpu",
                    "dtype": "float32", "max_model_len": engine.window,
                    "num_parameters": sum(p.numel() for p in engine.loaded.model.parameters())}
    assert kv["bytes_limit"] == KV_BYTES and kv["bytes_per_token"] == layout.bytes_per_token
    assert kv["tokens_limit"] == KV_BYTES // layout.bytes_per_token
    assert 0 <= kv["bytes_used"] <= kv["bytes_peak"] <= KV_BYTES


async def test_model_info_while_loading(tiny_model_cache_dir):
    async with running_app(worker_settings(tiny_model_cache_dir, model_name="no-such-model"),
                           ready=False) as (_, client):
        body = (await client.get("/inference/model/info")).json()
        assert body["loaded"] is False and body["model_name"] == "no-such-model" and "model_info" not in body


async def test_tokenizer_routes_need_the_internal_token(tiny_model_cache_dir):
    settings = worker_settings(tiny_model_cache_dir, internal_token="s3cret")
    async with running_app(settings, ready=False) as (_, client):
        for path, body in (("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]}),
                           ("/internal/reset_prefix_cache", None)):
            assert_error(await client.post(path, json=body), 401, "unauthorized")
        assert (await client.get("/inference/model/info")).status_code == 200
