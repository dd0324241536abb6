"""The gateway's client of the coordinator (its routing state, long-polled by ring_sync), and small
helpers for reading other services' JSON."""

import asyncio
import json
from typing import Any

from pydantic import ValidationError

from services.common.errors import Unavailable, UpstreamError
from services.common.schemas import RingState
from services.gateway.upstream import UpstreamClient, UpstreamFailure

# A ring answer this large (about 100 worker records, ~1 ms to parse) is parsed in a thread: a
# thousand new workers' records cost 5-8 ms of loop time otherwise. The thread still holds the GIL,
# but hands it back to the loop every switch interval (5 ms).
PARSE_OFF_LOOP_BYTES = 32 * 1024


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
    if isinstance(exc, UpstreamFailure):
        return str(exc)  # names aiohttp's error already
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class CoordinatorClient:
    def __init__(self, client: UpstreamClient, base_url: str) -> None:
        self._client = client
        self._base_url = base_url.rstrip("/")

    async def ring(self, after: int = -1, seq: int = 0, load_after: int = -1, instance: str = "",
                   wait_s: float = 0.0) -> RingState:
        """The routing state, or with `after` (versions of `instance`) what changed since, once
        something did (or `wait_s` passed)."""
        params = {"after": after, "seq": seq, "load_after": load_after, "instance": instance, "wait_s": wait_s}
        try:
            response = await self._client.request("GET", self._base_url + "/ring", params=params,
                                                  timeout_s=wait_s + 5.0)
            content = await response.read()
        except UpstreamFailure as exc:
            raise Unavailable(f"coordinator unreachable: {exc}") from exc
        if response.status != 200:
            raise UpstreamError(f"coordinator answered HTTP {response.status}: "
                                f"{error_message(json_or_none(content)) or 'no JSON body'}")
        if len(content) < PARSE_OFF_LOOP_BYTES:
            return parse_ring(content)
        return await asyncio.to_thread(parse_ring, content)


def parse_ring(content: bytes) -> RingState:
    try:
        return RingState.model_validate_json(content)
    except ValidationError as exc:
        raise UpstreamError(f"coordinator sent an invalid ring: {exc.error_count()} errors") from exc
