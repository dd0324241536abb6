"""The one error mapping: a 405 names every method of its path (a path can have several routes)."""

import httpx
from fastapi import FastAPI

from services.common.errors import install_error_handlers


async def test_a_405_allows_every_method_of_the_path():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/sequences/{seq_id}")
    async def read(seq_id: str) -> dict:
        return {}

    @app.delete("/sequences/{seq_id}")
    async def delete(seq_id: str) -> dict:
        return {}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        for method in ("OPTIONS", "POST", "PUT"):
            response = await client.request(method, "/sequences/s-1")
            assert response.status_code == 405
            assert response.headers["allow"] == "DELETE, GET"
            assert response.json()["error"]["type"] == "http_error"
