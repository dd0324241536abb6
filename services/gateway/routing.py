"""The gateway's client of the coordinator: who owns a sequence, and which workers exist."""

import json
from collections.abc import Collection
from typing import Any

import httpx
from pydantic import ValidationError

from services.common.errors import Unavailable, UpstreamError
from services.common.http import path_segment
from services.common.schemas import RouteResponse


def error_message(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        return str(message) if message is not None else None
    return None


def json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class CoordinatorClient:
    def __init__(self, client: httpx.AsyncClient, base_url: str) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")

    async def route(self, seq_id: str, exclude: Collection[str] = ()) -> RouteResponse:
        """The owner of `seq_id` among the workers not excluded (the unreachable ones)."""
        query = f"?exclude={','.join(sorted(exclude))}" if exclude else ""
        body = await self._get_json(f"/route/{path_segment(seq_id)}{query}")
        try:
            return RouteResponse.model_validate(body)
        except ValidationError as exc:
            raise UpstreamError(f"coordinator sent an invalid route: {exc.error_count()} errors") from exc

    async def workers(self) -> list[dict]:
        body = await self._get_json("/workers")
        workers = body.get("workers") if isinstance(body, dict) else None
        if not isinstance(workers, list):
            raise UpstreamError("coordinator sent an invalid worker list")
        return [w for w in workers if isinstance(w, dict) and isinstance(w.get("worker_id"), str)]

    async def _get_json(self, path: str) -> Any:
        try:
            response = await self._client.get(self._base_url + path)
        except httpx.HTTPError as exc:
            raise Unavailable(f"coordinator unreachable: {describe(exc)}") from exc
        body = json_or_none(response.content)
        message = error_message(body)
        if response.status_code == 503:
            raise Unavailable(message or "no worker available")
        if response.status_code != 200 or body is None:
            raise UpstreamError(f"coordinator answered HTTP {response.status_code}: {message or 'no JSON body'}")
        return body
