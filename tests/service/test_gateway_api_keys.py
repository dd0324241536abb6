"""GATEWAY_API_KEYS on the gateway app in-process: 401 without a right key on every route but
/health and /metrics, in the error shape of the route's API; a right key reaches the route."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from services.gateway.api_keys import ApiKeyMiddleware
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from tests.loopback import LoopbackServer

KEYS = "key-one, key-two"
ROUTES = (("POST", "/generate"), ("GET", "/stats"), ("GET", "/openapi.json"), ("GET", "/docs"),
          ("DELETE", "/sequences/a"), ("GET", "/nowhere"), ("GET", "/health/"))


def fake_coordinator() -> FastAPI:
    app = FastAPI()

    @app.get("/ring")
    async def ring() -> dict:  # never waits: the gateway polls again after a short pause
        return {"instance": "fake", "version": 1, "epoch": 1, "vnodes": 10, "workers": []}

    return app


@asynccontextmanager
async def gateway(keys: str) -> AsyncIterator[httpx.AsyncClient]:
    coordinator = LoopbackServer(fake_coordinator())
    await coordinator.start()
    try:
        app = create_app(GatewaySettings(api_keys=keys, coordinator_url=coordinator.url))
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
                yield client
    finally:
        await coordinator.stop()


async def test_without_a_right_key_every_route_but_health_and_metrics_is_401():
    async with gateway(KEYS) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"},
                        {"Authorization": "key-one"}, {"Authorization": "Bearer"}):
            for method, path in ROUTES:
                response = await client.request(method, path, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
                assert response.headers["content-type"] == "application/json"
                assert set(response.json()) == {"error"}
                assert response.json()["error"]["type"] == "unauthorized"
                assert "key-one" not in response.text and "key-two" not in response.text
        assert (await client.get("/health")).json()["status"] == "ok"
        assert (await client.get("/metrics")).status_code == 200


async def test_missing_and_invalid_keys_get_different_messages():
    async with gateway(KEYS) as client:
        missing = await client.get("/stats")
        invalid = await client.get("/stats", headers={"Authorization": "Bearer key-one-but-longer"})
    assert missing.json() == {"error": {"type": "unauthorized",
                                        "message": "missing API key: send Authorization: Bearer <key>"}}
    assert invalid.json() == {"error": {"type": "unauthorized", "message": "invalid API key"}}


async def test_v1_routes_answer_401_in_openais_shape():
    async with gateway(KEYS) as client:
        missing = await client.get("/v1/models")
        wrong = await client.post("/v1/chat/completions", json={}, headers={"Authorization": "Bearer nope"})
        unknown = await client.get("/v1/anything")
        bare = await client.get("/v1")
    assert missing.status_code == 401
    assert missing.json() == {"error": {"message": "missing API key: send Authorization: Bearer <key>",
                                        "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    for response in (wrong, unknown, bare):
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_each_configured_key_reaches_the_route():
    async with gateway(KEYS) as client:
        for header in ("Bearer key-one", "bearer key-two", "BEARER  key-one "):
            response = await client.get("/stats", headers={"Authorization": header})
            assert response.status_code == 200, header
            assert response.json()["num_workers"] == 0
        models = await client.get("/v1/models", headers={"Authorization": "Bearer key-two"})
        assert models.status_code == 200
        assert models.json()["data"] == []


async def test_metrics_count_the_401s():
    async with gateway(KEYS) as client:
        for _ in range(3):
            assert (await client.post("/generate", json={})).status_code == 401
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/stats", headers={"Authorization": "Bearer key-one"})).status_code == 200
        text = (await client.get("/metrics")).text
    assert 'kvcache_gateway_requests_total{code_class="4xx",endpoint="generate"} 3.0' in text
    assert 'kvcache_gateway_requests_total{code_class="4xx",endpoint="models"} 1.0' in text
    assert 'kvcache_gateway_requests_total{code_class="2xx",endpoint="stats"} 1.0' in text


async def test_no_keys_no_check():
    async with gateway("") as client:
        stats = await client.get("/stats")
        generate = await client.post("/generate", json={"prompt": ""})
        models = await client.get("/v1/models", headers={"Authorization": "Bearer anything"})
    assert stats.status_code == 200 and stats.json()["num_workers"] == 0
    assert generate.status_code == 422  # reached the route: validation, not auth
    assert models.status_code == 200


async def test_lifespan_passes_through():
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["type"])

    middleware = ApiKeyMiddleware(inner, [b"key-one"])
    await middleware({"type": "lifespan"}, None, None)
    assert seen == ["lifespan"]
