"""The KV tensor API through the gateway, against real processes on loopback (a coordinator, two
tiny-gpt2 workers, gateways): the reference design's put/append/get/length on the seq_id's owner,
tenants kept apart, size limits, and workers that refuse calls without the internal token."""

import base64
import io

import httpx
import pytest
import torch

from tests.support import extra_gateway

pytestmark = pytest.mark.e2e

KEY_A, KEY_B = "kv-key-a-0123456789", "kv-key-b-9876543210"


def wire(tensor: torch.Tensor) -> dict:
    """The reference design's serialize_tensor: torch.save's bytes, base64."""
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return {"data": base64.b64encode(buffer.getvalue()).decode(), "shape": list(tensor.shape),
            "dtype": str(tensor.dtype)}


def unwire(tensor: dict) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(tensor["data"])), weights_only=True)


def worker_addresses(cluster) -> dict[str, str]:
    ring = httpx.get(f"{cluster.coordinator_url}/ring", timeout=5).json()
    return {w["worker_id"]: w["address"] for w in ring["workers"]}


@pytest.fixture(scope="module")
def keyed_gateway(cluster, tmp_path_factory):
    with extra_gateway(cluster, tmp_path_factory.mktemp("kv-keyed"), GATEWAY_API_KEYS=f"{KEY_A},{KEY_B}") as url:
        yield url


def test_put_append_get_length_and_delete_on_the_seq_ids_owner(cluster):
    seq_id = "kv-e2e-seq"
    k, v = torch.randn(5, 12, 64), torch.randn(5, 12, 64)
    with httpx.Client(base_url=cluster.gateway_url, timeout=30) as client:
        put = client.post("/kv/put", json={"seq_id": seq_id, "layer": 0, "k": wire(k), "v": wire(v)})
        assert put.status_code == 200, put.text
        owner = put.json()["worker_id"]
        for _ in range(3):
            nk, nv = torch.randn(1, 12, 64), torch.randn(1, 12, 64)
            k, v = torch.cat([k, nk]), torch.cat([v, nv])
            append = client.post("/kv/append", json={"seq_id": seq_id, "layer": 0, "k": wire(nk), "v": wire(nv)})
            assert append.status_code == 200 and append.json()["worker_id"] == owner
        got = client.post("/kv/get", json={"seq_id": seq_id, "layer": 0})
        assert got.status_code == 200, got.text
        body = got.json()
        assert (body["seq_id"], body["seq_len"], body["worker_id"]) == (seq_id, 8, owner)
        assert torch.equal(unwire(body["k"]), k) and torch.equal(unwire(body["v"]), v)
        assert client.get(f"/kv/{seq_id}/0/length").json()["seq_len"] == 8
        # The tensors are on the owner only: the other worker holds nothing for this seq_id.
        for worker_id, address in worker_addresses(cluster).items():
            there = httpx.get(f"{address}/kv/{seq_id}/0/length", headers=cluster.internal_headers, timeout=5)
            assert there.json()["seq_len"] == (8 if worker_id == owner else 0)
        assert client.delete(f"/kv/{seq_id}").json()["num_layers"] == 1
        assert client.post("/kv/get", json={"seq_id": seq_id, "layer": 0}).status_code == 404


def test_one_key_cannot_read_or_change_another_keys_tensors(keyed_gateway):
    mine = torch.ones(2, 1, 4)
    a = httpx.Client(base_url=keyed_gateway, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
    b = httpx.Client(base_url=keyed_gateway, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=30)
    with a, b:
        put = a.post("/kv/put", json={"seq_id": "secret", "layer": 0, "k": wire(mine), "v": wire(mine)})
        assert put.status_code == 200 and put.json()["seq_id"] == "secret"
        refused = b.post("/kv/get", json={"seq_id": "secret", "layer": 0})
        assert refused.status_code == 404 and refused.json()["error"]["type"] == "not_found"
        assert "secret" not in refused.text
        assert b.get("/kv/secret/0/length").json()["seq_len"] == 0
        assert b.delete("/kv/secret").json()["num_layers"] == 0
        theirs = torch.zeros(1, 1, 4)
        assert b.post("/kv/append", json={"seq_id": "secret", "layer": 0, "k": wire(theirs),
                                          "v": wire(theirs)}).json()["seq_len"] == 1  # B's own, new
        got = a.post("/kv/get", json={"seq_id": "secret", "layer": 0}).json()
        assert got["seq_len"] == 2 and torch.equal(unwire(got["k"]), mine)
        anonymous = httpx.post(f"{keyed_gateway}/kv/get", json={"seq_id": "secret", "layer": 0}, timeout=10)
        assert anonymous.status_code == 401


def test_oversize_requests_are_refused_with_413(cluster):
    small = wire(torch.zeros(1, 1, 4))
    with httpx.Client(base_url=cluster.gateway_url, timeout=30) as client:
        too_big = {"data": "A" * (5 * 2**20), "shape": [1, 1, 1], "dtype": "torch.float32"}  # past 4 MiB
        body = client.post("/kv/put", json={"seq_id": "big", "layer": 0, "k": too_big, "v": small})
        assert body.status_code == 413 and body.json()["error"]["type"] == "request_too_large"
        declared = {**small, "shape": [4096, 1024, 1024]}  # 16 GiB declared: refused before decoding
        tensor = client.post("/kv/put", json={"seq_id": "big", "layer": 0, "k": declared, "v": small})
        assert tensor.status_code == 413 and tensor.json()["error"]["type"] == "kv_too_large"
        assert client.get("/kv/big/0/length").json()["seq_len"] == 0


def test_a_worker_refuses_kv_calls_without_the_internal_token(cluster):
    small = wire(torch.zeros(1, 1, 4))
    body = {"seq_id": "direct", "layer": 0, "k": small, "v": small}
    address = cluster.worker_urls[0]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        refused = httpx.post(f"{address}/kv/put", json=body, headers=headers, timeout=10)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "unauthorized"
        assert httpx.get(f"{address}/kv/direct/0/length", headers=headers, timeout=10).status_code == 401
    assert httpx.post(f"{address}/kv/put", json=body, headers=cluster.internal_headers, timeout=10).status_code == 200
