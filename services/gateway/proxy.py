"""Forwarding to a sequence's owner worker: re-route once when it cannot be reached, relay JSON or SSE."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from typing import Any

import anyio
import httpx
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.common.errors import Unavailable, UpstreamError, error_body
from services.common.sse import TERMINAL_TYPES, aparse_events, encode_event
from services.gateway.metrics import GatewayMetrics
from services.gateway.routing import CoordinatorClient, describe, error_message, json_or_none, path_segment

NUM_ATTEMPTS = 2  # the first try and one retry after asking the coordinator again
STATS_TIMEOUT_S = 2.0
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)


def upstream_error_event(message: str) -> dict:
    return {"type": "error", "error": {"type": UpstreamError.error_type, "message": message}}


async def relay_events(upstream: httpx.Response) -> AsyncIterator[dict]:
    """The worker's events in order, always ending with exactly one terminal event."""
    try:
        async for event in aparse_events(upstream.aiter_lines()):
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ValueError("event without a type")
            yield event
            if event["type"] in TERMINAL_TYPES:
                return
        message = "worker stream ended without a done or error event"
    except (httpx.HTTPError, ValueError) as exc:
        message = f"worker stream broke: {describe(exc)}"
    yield upstream_error_event(message)


def stream_outcome(terminal_event: dict) -> str:
    if terminal_event["type"] == "done":
        return "done"
    error = terminal_event.get("error")
    is_ours = isinstance(error, dict) and error.get("type") == UpstreamError.error_type
    return "upstream_error" if is_ours else "error"


async def relay_json(upstream: httpx.Response) -> JSONResponse:
    """The worker's status, JSON body and Retry-After; a non-JSON error body becomes our error shape."""
    try:
        content = await upstream.aread()
    except httpx.HTTPError as exc:
        raise UpstreamError(f"worker response broke: {describe(exc)}") from exc
    finally:
        await upstream.aclose()
    body = json_or_none(content)
    if upstream.is_success and (not isinstance(body, dict) or "error" in body):
        raise UpstreamError(f"worker sent an invalid HTTP {upstream.status_code} body")
    if not upstream.is_success and error_message(body) is None:
        body = error_body(UpstreamError.error_type, f"worker answered HTTP {upstream.status_code}")
    retry_after = upstream.headers.get("retry-after")
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse(body, status_code=upstream.status_code, headers=headers)


class RelayResponse(EventSourceResponse):
    """SSE to the client that closes the worker's stream however it ends (done, broken, client gone,
    cancelled), so a client disconnect reaches the worker and it stops generating."""

    def __init__(self, upstream: httpx.Response, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, sep="\n")
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True), suppress(httpx.HTTPError):
                await self._upstream.aclose()


def sum_numeric(stats: list[dict]) -> dict[str, float]:
    totals: dict[str, Any] = {}
    for one in stats:
        for key, value in one.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    return totals


class GatewayProxy:
    def __init__(self, client: httpx.AsyncClient, coordinator: CoordinatorClient,
                 metrics: GatewayMetrics) -> None:
        self._client = client
        self._coordinator = coordinator
        self._metrics = metrics

    async def generate(self, payload: dict, *, stream: bool) -> Response:
        started_s = time.perf_counter()
        upstream = await self._send_to_owner(payload["seq_id"], "POST", "/generate", json=payload)
        if stream and upstream.status_code == 200:
            return RelayResponse(upstream, self._encoded_events(upstream, started_s))
        response = await relay_json(upstream)
        if response.status_code == 200:
            self._metrics.ttfb_s.observe(time.perf_counter() - started_s)
        return response

    async def delete_sequence(self, seq_id: str) -> JSONResponse:
        upstream = await self._send_to_owner(seq_id, "DELETE", f"/sequences/{path_segment(seq_id)}")
        return await relay_json(upstream)

    async def cluster_stats(self) -> dict:
        workers = await self._coordinator.workers()
        results = await asyncio.gather(*(self._worker_stats(w.get("address")) for w in workers))
        per_worker, unreachable = {}, []
        for worker, (stats, failure) in zip(workers, results):
            per_worker[worker["worker_id"]] = stats if stats is not None else {"error": failure}
            if stats is None:
                unreachable.append(worker["worker_id"])
        reachable = [stats for stats, _ in results if stats is not None]
        return {"num_workers": len(workers), "workers": per_worker,
                "totals": sum_numeric(reachable), "unreachable": unreachable}

    async def _send_to_owner(self, seq_id: str, method: str, path: str,
                             json: dict | None = None) -> httpx.Response:
        """Open a streamed request to the owner; if it cannot be reached, ask the coordinator again once."""
        for attempt in range(NUM_ATTEMPTS):
            if attempt:
                self._metrics.upstream_retries.inc()
            route = await self._coordinator.route(seq_id)
            try:
                request = self._client.build_request(method, route.address.rstrip("/") + path, json=json)
                return await self._client.send(request, stream=True)
            except _UNREACHABLE as exc:
                failure = f"worker {route.worker_id} unreachable: {describe(exc)}"
            except httpx.PoolTimeout as exc:
                raise Unavailable("gateway has no free upstream connection") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise UpstreamError(f"worker {route.worker_id} failed before answering: {describe(exc)}") from exc
        raise Unavailable(failure)

    async def _encoded_events(self, upstream: httpx.Response, started_s: float) -> AsyncIterator[bytes]:
        outcome, last_event = "client_disconnect", None
        self._metrics.active_streams.inc()
        try:
            async with aclosing(relay_events(upstream)) as events:
                async for event in events:
                    if last_event is None:
                        self._metrics.ttfb_s.observe(time.perf_counter() - started_s)
                    last_event = event
                    yield encode_event(event)
            outcome = stream_outcome(last_event)
        finally:
            self._metrics.active_streams.dec()
            self._metrics.streams.labels(outcome).inc()

    async def _worker_stats(self, address: Any) -> tuple[dict | None, str | None]:
        if not isinstance(address, str):
            return None, "worker has no address"
        try:
            response = await self._client.get(f"{address.rstrip('/')}/stats", timeout=STATS_TIMEOUT_S)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return None, describe(exc)
        body = json_or_none(response.content)
        if response.status_code != 200 or not isinstance(body, dict):
            return None, error_message(body) or f"HTTP {response.status_code}"
        return body, None
