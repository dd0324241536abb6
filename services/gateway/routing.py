"""The gateway's client of the coordinator (its routing state, long-polled by ring_sync), and small
helpers for reading other services' JSON."""

import json
from typing import Any

import httpx
from pydantic import ValidationError

from services.common.errors import Unavailable, UpstreamError
from services.common.schemas import RingSnapshot


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

    async def ring(self, after: int = -1, instance: str = "", wait_s: float = 0.0) -> RingSnapshot:
        """The routing state; with `after`, once it is newer than that version (or `wait_s` passed)."""
        params = {"after": after, "instance": instance, "wait_s": wait_s}
        try:
            response = await self._client.get(self._base_url + "/ring", params=params,
                                              timeout=httpx.Timeout(wait_s + 5.0, connect=2.0))
        except httpx.HTTPError as exc:
            raise Unavailable(f"coordinator unreachable: {describe(exc)}") from exc
        body = json_or_none(response.content)
        if response.status_code != 200 or body is None:
            raise UpstreamError(f"coordinator answered HTTP {response.status_code}: "
                                f"{error_message(body) or 'no JSON body'}")
        try:
            return RingSnapshot.model_validate(body)
        except ValidationError as exc:
            raise UpstreamError(f"coordinator sent an invalid ring: {exc.error_count()} errors") from exc
