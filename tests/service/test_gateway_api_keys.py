"""GATEWAY_API_KEYS: the key file format, and the gateway app answering 401 without a right key
(every route but /health and /metrics), in the error shape of the route's API."""

import httpx
import pytest
from fastapi import FastAPI

from services.gateway.api_keys import ApiKeyMiddleware, load_api_keys
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings

KEYS = "key-one, key-two"


def test_keys_from_a_comma_list():
    assert load_api_keys("") == []
    assert load_api_keys(" a , b,,") == [b"a", b"b"]


def test_keys_from_a_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# rotated 2026-11\nold-key\n\nnew-key, third\n")
    assert load_api_keys(f"@{path}") == [b"old-key", b"new-key", b"third"]
    path.write_text("# nothing but comments\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(f"@{path}")
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(f"@{tmp_path / 'missing'}")


def gateway(keys: str) -> httpx.AsyncClient:
    app = create_app(GatewaySettings(api_keys=keys, coordinator_url="http://127.0.0.1:9"))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


async def test_without_a_right_key_every_route_but_health_and_metrics_is_401():
    async with gateway(KEYS) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"},
                        {"Authorization": "Bearer"}):
            for method, path in (("POST", "/generate"), ("GET", "/stats"), ("GET", "/openapi.json"),
                                 ("GET", "/docs"), ("DELETE", "/sequences/a"), ("GET", "/nowhere")):
                response = await client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.json()["error"]["type"] == "unauthorized"
                assert "key-one" not in response.text
        assert (await client.get("/health")).status_code == 200
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert 'kvcache_gateway_requests_total{code_class="4xx",endpoint="generate"} 4.0' in metrics.text


async def test_v1_routes_answer_401_in_openais_shape():
    async with gateway(KEYS) as client:
        missing = await client.get("/v1/models")
        wrong = await client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer nope"})
    assert missing.json() == {"error": {"message": "missing API key: send Authorization: Bearer <key>",
                                        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"


async def test_each_configured_key_passes():
    inner = FastAPI()

    @inner.get("/stats")
    async def stats() -> dict:
        return {"ok": True}

    app = ApiKeyMiddleware(inner, load_api_keys(KEYS))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        for key in ("key-one", "key-two"):
            response = await client.get("/stats", headers={"Authorization": f"bearer {key}"})
            assert response.json() == {"ok": True}
        assert (await client.get("/stats")).status_code == 401


async def test_no_keys_no_check():
    async with gateway("") as client:
        response = await client.post("/generate", json={"prompt": ""})
    assert response.status_code == 422  # reached the route: validation, not auth
