"""The worker's KV tensor API in-process (POST /kv/put|get|append, GET /kv/{seq_id}/{layer}/length,
DELETE /kv/{seq_id}): the reference design's shapes and encoding, raw encoding, limits, errors and
the internal token."""

import base64
import io

import pytest
import pytest_asyncio
import torch

from tests.service.test_worker_api import assert_error, running_app, worker_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "worker-kv-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_TENSOR_BYTES = 64 * 1024
BUDGET_BYTES = 1024 * 1024


def reference_tensor(tensor: torch.Tensor) -> dict:
    """The reference design's serialize_tensor (tests/tensor_utils.py there), as its clients send it."""
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return {"data": base64.b64encode(buffer.getvalue()).decode(), "shape": list(tensor.shape),
            "dtype": str(tensor.dtype)}


def raw_tensor(tensor: torch.Tensor) -> dict:
    data = base64.b64encode(tensor.contiguous().view(torch.uint8).numpy().tobytes()).decode()
    return {"data": data, "shape": list(tensor.shape), "dtype": str(tensor.dtype), "encoding": "raw"}


def reference_load(wire: dict) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(wire["data"])), weights_only=True)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(tiny_model_cache_dir):
    settings = worker_settings(tiny_model_cache_dir, internal_token=TOKEN, worker_id="w-kv",
                               kv_tensor_max_bytes=MAX_TENSOR_BYTES, kv_tensor_bytes=BUDGET_BYTES,
                               max_body_bytes=256 * 1024)
    async with running_app(settings) as (app, client):
        client.headers.update(AUTH)
        yield app, client


async def test_put_append_get_and_length_in_the_reference_designs_format(worker):
    _, client = worker
    k, v = torch.randn(5, 12, 64), torch.randn(5, 12, 64)
    put = await client.post("/kv/put", json={"seq_id": "ref", "layer": 0, "k": reference_tensor(k),
                                             "v": reference_tensor(v)})
    assert put.status_code == 200, put.text
    assert put.json() == {"status": "ok", "seq_id": "ref", "layer": 0, "seq_len": 5,
                          "tensor_shapes": {"k": [5, 12, 64], "v": [5, 12, 64]},
                          "tensor_dtypes": {"k": "torch.float32", "v": "torch.float32"}, "worker_id": "w-kv"}
    appended_k, appended_v = [k], [v]
    for i in range(3):
        nk, nv = torch.randn(1, 12, 64), torch.randn(1, 12, 64)
        appended_k.append(nk)
        appended_v.append(nv)
        append = await client.post("/kv/append", json={"seq_id": "ref", "layer": 0, "k": reference_tensor(nk),
                                                       "v": reference_tensor(nv)})
        assert append.status_code == 200 and append.json()["seq_len"] == 6 + i
        assert append.json()["tensor_shapes"] == {"k": [1, 12, 64], "v": [1, 12, 64]}  # of what was sent
    got = await client.post("/kv/get", json={"seq_id": "ref", "layer": 0})
    assert got.status_code == 200, got.text
    body = got.json()
    assert (body["seq_id"], body["layer"], body["seq_len"], body["worker_id"]) == ("ref", 0, 8, "w-kv")
    assert body["k"]["shape"] == [8, 12, 64] and body["k"]["dtype"] == "torch.float32"
    assert torch.equal(reference_load(body["k"]), torch.cat(appended_k))
    assert torch.equal(reference_load(body["v"]), torch.cat(appended_v))
    length = await client.get("/kv/ref/0/length")
    assert length.json() == {"seq_id": "ref", "layer": 0, "seq_len": 8, "worker_id": "w-kv"}
    assert (await client.get("/kv/ref/1/length")).json()["seq_len"] == 0  # the reference's answer: 0


async def test_raw_encoding_round_trips_every_kv_dtype(worker):
    _, client = worker
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        k, v = torch.randn(3, 2, 8).to(dtype), torch.randn(3, 2, 4).to(dtype)  # K and V head sizes may differ
        put = await client.post("/kv/put", json={"seq_id": "raw", "layer": 2, "k": raw_tensor(k), "v": raw_tensor(v)})
        assert put.status_code == 200, put.text
        got = (await client.post("/kv/get", json={"seq_id": "raw", "layer": 2, "encoding": "raw"})).json()
        assert got["k"]["encoding"] == "raw" and got["k"]["dtype"] == str(dtype)
        back = torch.frombuffer(bytearray(base64.b64decode(got["v"]["data"])), dtype=dtype).reshape(got["v"]["shape"])
        assert torch.equal(back, v)


async def test_delete_removes_every_layer_of_a_seq_id(worker):
    _, client = worker
    for layer in range(3):
        k = raw_tensor(torch.zeros(2, 1, 4))
        put = await client.post("/kv/put", json={"seq_id": "gone", "layer": layer, "k": k, "v": k})
        assert put.status_code == 200
    deleted = await client.delete("/kv/gone")
    assert deleted.json() == {"status": "evicted", "seq_id": "gone", "num_layers": 3, "worker_id": "w-kv"}
    assert_error(await client.post("/kv/get", json={"seq_id": "gone", "layer": 1}), 404, "not_found")


async def test_bad_tensors_get_clear_4xx_errors(worker):
    _, client = worker
    good = raw_tensor(torch.zeros(2, 3, 4))
    await client.post("/kv/put", json={"seq_id": "bad", "layer": 0, "k": good, "v": good})
    wider = raw_tensor(torch.zeros(1, 4, 4))
    cases = [
        ({"seq_id": "bad", "layer": 0, "k": wider, "v": wider}, "/kv/append", 400, "kv_shape_mismatch"),
        ({"seq_id": "bad", "layer": 0, "k": raw_tensor(torch.zeros(1, 3, 4)), "v": good}, "/kv/put", 400,
         "kv_shape_mismatch"),
        ({"seq_id": "bad", "layer": 0, "k": {**good, "data": "%%%%"}, "v": good}, "/kv/put", 400, "invalid_tensor"),
        ({"seq_id": "bad", "layer": 0, "k": {**good, "shape": [3, 3, 4]}, "v": good}, "/kv/put", 400,
         "invalid_tensor"),
        ({"seq_id": "bad", "layer": 0, "k": {**reference_tensor(torch.zeros(2, 3, 4)), "dtype": "torch.float16"},
          "v": good}, "/kv/put", 400, "invalid_tensor"),
        ({"seq_id": "bad", "layer": 0, "k": {**good, "shape": [1024, 1024, 1024]}, "v": good}, "/kv/put", 413,
         "kv_too_large"),
        ({"seq_id": "bad", "layer": 1024, "k": good, "v": good}, "/kv/put", 422, "invalid_request"),
        ({"seq_id": "bad/../x", "layer": 0, "k": good, "v": good}, "/kv/put", 422, "invalid_request"),
        ({"seq_id": "bad", "layer": 0, "k": {**good, "shape": [2, 12]}, "v": good}, "/kv/put", 422, "invalid_request"),
        ({"seq_id": "bad", "layer": 0, "k": {**good, "dtype": "torch.int64"}, "v": good}, "/kv/put", 422,
         "invalid_request"),
        ({"seq_id": "bad", "layer": 0, "step": 0, "k": good, "v": good}, "/kv/put", 422, "invalid_request"),
    ]
    for body, path, status, error_type in cases:
        assert_error(await client.post(path, json=body), status, error_type)
    assert_error(await client.post("/kv/put", content=b"{not json"), 422, "invalid_request")
    got = (await client.post("/kv/get", json={"seq_id": "bad", "layer": 0, "encoding": "raw"})).json()
    assert got["seq_len"] == 2 and got["k"]["shape"] == [2, 3, 4]  # nothing refused changed the layer


async def test_appends_past_the_per_tensor_limit_are_413(worker):
    _, client = worker
    rows = MAX_TENSOR_BYTES // (4 * 64)  # float32 [rows, 4, 16] fills the limit exactly
    full = raw_tensor(torch.zeros(rows, 4, 16))
    assert (await client.post("/kv/put", json={"seq_id": "full", "layer": 0, "k": full, "v": full})).status_code == 200
    one = raw_tensor(torch.zeros(1, 4, 16))
    assert_error(await client.post("/kv/append", json={"seq_id": "full", "layer": 0, "k": one, "v": one}),
                 413, "kv_too_large")


async def test_a_request_over_the_body_limit_is_413_before_decoding(worker):
    _, client = worker
    huge = {"data": "A" * 300_000, "shape": [1, 1, 1], "dtype": "float32"}
    assert_error(await client.post("/kv/put", json={"seq_id": "huge", "layer": 0, "k": huge, "v": huge}),
                 413, "request_too_large")


async def test_stats_count_the_store(worker):
    _, client = worker
    stats = (await client.get("/stats")).json()
    assert stats["kv_tensor_budget_bytes"] == BUDGET_BYTES
    assert 0 < stats["kv_tensor_bytes"] <= BUDGET_BYTES and stats["kv_tensor_seqs"] >= 3
    assert stats["kv_tensor_puts"] >= 3 and stats["kv_tensor_appends"] >= 3 and stats["kv_tensor_refused"] >= 1


async def test_every_kv_route_needs_the_internal_token(worker):
    _, client = worker
    good = raw_tensor(torch.zeros(1, 1, 1))
    calls = [("POST", "/kv/put", {"seq_id": "t", "layer": 0, "k": good, "v": good}),
             ("POST", "/kv/append", {"seq_id": "t", "layer": 0, "k": good, "v": good}),
             ("POST", "/kv/get", {"seq_id": "ref", "layer": 0}), ("GET", "/kv/ref/0/length", None),
             ("DELETE", "/kv/ref", None)]
    for method, path, body in calls:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}):
            assert_error(await client.request(method, path, json=body, headers=headers), 401, "unauthorized")
    assert (await client.get("/kv/ref/0/length")).json()["seq_len"] == 8  # nothing was deleted
