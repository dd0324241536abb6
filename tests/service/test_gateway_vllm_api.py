"""vLLM's server routes on the gateway in-process, in front of the fake workers of
test_gateway_api: served model names in /v1, /tokenize and /detokenize relayed to a worker,
/reset_prefix_cache on every worker, /version, X-Request-Id on every response."""

from importlib.metadata import version

import pytest

from tests.service.test_gateway_api import cluster  # noqa: F401 - the fixture

CHAT = [{"role": "user", "content": "hi"}]


async def test_models_list_every_served_name_with_its_window(cluster):  # noqa: F811
    cluster.served_names = ["gpt2", "tiny"]
    await cluster.set_ring(["w1", "w2"])
    models = (await cluster.gateway.get("/v1/models")).json()["data"]
    assert [(m["id"], m["root"], m["max_model_len"], m["parent"]) for m in models] == [
        ("gpt2", "tiny", 64, None), ("tiny", "tiny", 64, None)]
    assert (await cluster.gateway.get("/v1/models/gpt2")).json()["root"] == "tiny"
    for name in ("gpt2", "tiny"):
        response = await cluster.gateway.post("/v1/completions", json={"model": name, "prompt": "a b"})
        assert response.status_code == 200 and response.json()["model"] == name
    missing = await cluster.gateway.post("/v1/completions", json={"model": "gpt2-xl", "prompt": "a"})
    assert missing.status_code == 404 and "served: gpt2, tiny" in missing.json()["error"]["message"]


async def test_a_worker_without_served_names_is_known_by_its_model(cluster):  # noqa: F811
    assert [m["id"] for m in (await cluster.gateway.get("/v1/models")).json()["data"]] == ["tiny"]


async def test_tokenize_and_detokenize_are_relayed_to_a_worker(cluster):  # noqa: F811
    response = await cluster.gateway.post("/tokenize", json={"model": "tiny", "prompt": "ab cde"})
    assert response.status_code == 200
    assert response.json() == {"count": 2, "max_model_len": 64, "tokens": [2, 3], "token_strs": None}
    assert cluster.workers["w1"].requests[-1] == {"prompt": "ab cde", "add_special_tokens": True,
                                                  "return_token_strs": False}
    back = await cluster.gateway.post("/detokenize", json={"tokens": [2, 3]})
    assert back.json() == {"prompt": "xx xxx"}


async def test_tokenize_skips_a_worker_that_is_draining(cluster):  # noqa: F811
    await cluster.set_ring(["w1", "w2"])
    cluster.workers["w1"].mode = "draining"
    response = await cluster.gateway.post("/tokenize", json={"prompt": "ab"})
    assert response.status_code == 200 and cluster.workers["w2"].requests


@pytest.mark.parametrize("path, body, status", [
    ("/tokenize", {"model": "gpt-4o", "prompt": "a"}, 404),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 422),
    ("/tokenize", {"prompt": "a", "n": 2}, 422),
    ("/detokenize", {"tokens": "abc"}, 422),
    ("/detokenize", {"model": "gpt-4o", "tokens": [1]}, 404),
])
async def test_bad_tokenizer_requests_reach_no_worker(cluster, path, body, status):  # noqa: F811
    response = await cluster.gateway.post(path, json=body)
    assert response.status_code == status and response.json()["error"]["message"]
    assert all(not fake.requests for fake in cluster.workers.values())


async def test_reset_prefix_cache_reaches_every_registered_worker(cluster):  # noqa: F811
    response = await cluster.gateway.post("/reset_prefix_cache")  # w2 is registered, draining
    assert response.status_code == 200
    body = response.json()
    assert body["num_workers"] == 2 and body["dropped_entries"] == 4 and body["freed_bytes"] == 200
    assert set(body["workers"]) == {"w1", "w2"}
    assert [fake.resets for fake in cluster.workers.values()] == [1, 1]


async def test_reset_prefix_cache_names_a_worker_that_did_not_answer(cluster):  # noqa: F811
    await cluster.servers["w2"].stop()
    response = await cluster.gateway.post("/reset_prefix_cache")
    assert response.status_code == 502
    assert "w2" in response.json()["error"]["message"] and cluster.workers["w1"].resets == 1


async def test_version(cluster):  # noqa: F811
    assert (await cluster.gateway.get("/version")).json() == {"version": version("kvcache")}


@pytest.mark.parametrize("method, path", [("GET", "/health"), ("POST", "/generate"), ("GET", "/v1/models"),
                                          ("POST", "/v1/completions"), ("GET", "/nowhere")])
async def test_x_request_id_is_echoed_or_made(cluster, method, path):  # noqa: F811
    given = await cluster.gateway.request(method, path, headers={"X-Request-Id": "req-42"}, json={})
    assert given.headers.get_list("x-request-id") == ["req-42"]
    made = await cluster.gateway.request(method, path, json={})
    assert len(made.headers["x-request-id"]) == 32


async def test_x_request_id_on_a_stream_and_a_bad_one_is_400(cluster):  # noqa: F811
    stream = await cluster.gateway.post("/generate", json={"prompt": "a b"}, headers={"X-Request-Id": "s-1"})
    assert stream.headers["x-request-id"] == "s-1" and stream.text.count("done") == 1
    sent = sum(len(fake.requests) for fake in cluster.workers.values())
    for path in ("/generate", "/v1/models"):
        bad = await cluster.gateway.post(path, json={"prompt": "a"}, headers={"X-Request-Id": "x" * 129})
        assert bad.status_code == 400 and "X-Request-Id" in bad.json()["error"]["message"]
        assert bad.headers["x-request-id"] != "x" * 129
    assert sum(len(fake.requests) for fake in cluster.workers.values()) == sent  # refused before routing
