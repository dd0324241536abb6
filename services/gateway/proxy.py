"""Forwarding to a sequence's owner worker: re-route past unreachable or draining workers, relay
JSON or SSE, and migrate a stream whose worker died to the sequence's new owner."""

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.common.errors import (Draining, HTTPStatusError, NotReady, ServiceError, Unavailable, UpstreamError,
                                   error_body)
from services.common.http import path_segment
from services.common.schemas import RouteResponse
from services.common.sse import TERMINAL_TYPES, aparse_events, encode_event
from services.gateway.metrics import GatewayMetrics
from services.gateway.routing import CoordinatorClient, describe, error_message, json_or_none

NUM_ATTEMPTS = 3  # the first try, then re-routes past workers that are unreachable or draining
STATS_TIMEOUT_S = 2.0
WORKERS_TTL_S = 1.0  # how stale the worker list behind /v1/models and round-robin may be
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)
# A worker's 503s that mean "not here, ask again": it is leaving, or (re)starting.
_REROUTE_ERRORS = frozenset({Draining.error_type, NotReady.error_type})


class StreamBroken(Exception):
    """The worker's stream ended before its terminal event (the worker died or the link broke)."""


def upstream_error_event(message: str, error_type: str = UpstreamError.error_type) -> dict:
    return {"type": "error", "error": {"type": error_type, "message": message}}


async def worker_events(upstream: httpx.Response) -> AsyncIterator[dict]:
    """The worker's events in order, up to its terminal event; StreamBroken if there is none."""
    try:
        async for event in aparse_events(upstream.aiter_lines()):
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise ValueError("event without a type")
            yield event
            if event["type"] in TERMINAL_TYPES:
                return
    except (httpx.HTTPError, ValueError) as exc:
        raise StreamBroken(f"worker stream broke: {describe(exc)}") from exc
    raise StreamBroken("worker stream ended without a done or error event")


def stream_outcome(terminal_event: dict) -> str:
    if terminal_event["type"] == "done":
        return "done"
    error = terminal_event.get("error")
    is_ours = isinstance(error, dict) and error.get("type") == UpstreamError.error_type
    return "upstream_error" if is_ours else "error"


async def read_json(upstream: httpx.Response) -> tuple[int, dict, str | None]:
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
    return upstream.status_code, body, upstream.headers.get("retry-after")


async def relay_json(upstream: httpx.Response) -> JSONResponse:
    status, body, retry_after = await read_json(upstream)
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse(body, status_code=status, headers=headers)


async def read_result(upstream: httpx.Response) -> dict:
    """A worker's 200 body; its error (status, type, message, Retry-After) raised as a ServiceError."""
    status, body, retry_after = await read_json(upstream)
    if status == 200:
        return body
    error = body["error"]
    retry_after_s = int(retry_after) if retry_after and retry_after.isdigit() else None
    raise HTTPStatusError(status, str(error.get("type") or UpstreamError.error_type), str(error["message"]),
                          retry_after_s=retry_after_s)


def sum_numeric(stats: list[dict]) -> dict[str, float]:
    totals: dict[str, Any] = {}
    for one in stats:
        for key, value in one.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    return totals


@dataclass
class Upstream:
    """An open request to a worker: its response (body not read yet), route and the body sent."""

    response: httpx.Response
    route: RouteResponse
    payload: dict | None


class GatewayProxy:
    def __init__(self, client: httpx.AsyncClient, coordinator: CoordinatorClient,
                 metrics: GatewayMetrics, migration_limit: int = 1, routing: str = "affinity") -> None:
        self._client = client
        self._coordinator = coordinator
        self.metrics = metrics
        self.migration_limit = migration_limit
        self.routing = routing
        self._turns = itertools.count()  # round-robin position
        self._workers: tuple[float, list[dict]] = (-WORKERS_TTL_S, [])

    async def generate(self, payload: dict, *, stream: bool) -> Response:
        started_s = time.perf_counter()
        upstream = await self.open_generate(payload)
        if stream and upstream.response.status_code == 200:
            relay = StreamRelay(self, upstream, self.metrics, started_s)
            return ClosingEventStream(relay.encoded(), relay.aclose)
        response = await relay_json(upstream.response)
        if response.status_code == 200:
            self.metrics.ttfb_s.observe(time.perf_counter() - started_s)
        return response

    async def open_generate(self, payload: dict, exclude: Collection[str] = ()) -> Upstream:
        seq_id = payload["seq_id"]

        async def owner(excluded: set[str]) -> RouteResponse:
            return await self._coordinator.route(seq_id, excluded)

        return await self._send(owner, "/generate", payload, exclude)

    async def open_completion(self, key: str, payload: dict) -> Upstream:
        """A stateless request: to the owner of its routing key (affinity: the worker that holds the
        conversation's KV), or to the next worker in turn (round_robin, for comparison)."""

        async def owner(excluded: set[str]) -> RouteResponse:
            if self.routing == "round_robin":
                return await self._next_in_turn(excluded)
            return await self._coordinator.route(key, excluded)

        return await self._send(owner, "/completions", payload)

    async def served_models(self) -> dict[str, int]:
        """Model name -> creation time (the Unix time its longest-serving worker registered)."""
        models: dict[str, int] = {}
        now = time.time()
        for worker in await self._cached_workers():
            name, age_s = worker.get("model_name"), worker.get("age_s")
            if isinstance(name, str) and worker.get("state") == "active":
                created = int(now - age_s) if isinstance(age_s, (int, float)) else int(now)
                models[name] = min(models.get(name, created), created)
        return models

    async def delete_sequence(self, seq_id: str) -> JSONResponse:
        """Removes the sequence from the session store and from every worker's KV: every worker
        is asked (any of them may hold its KV). 409 if a request runs on it, 404 if unknown."""
        workers = await self._coordinator.workers()
        path = f"/sequences/{path_segment(seq_id)}"
        answers = await asyncio.gather(*(self._delete_at(w.get("address"), path) for w in workers))
        for status in (409, 503, 200, 404):
            for answer in answers:
                if answer is not None and answer.status_code == status:
                    return answer
        raise Unavailable("no worker could be asked to delete the sequence")

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

    async def _send(self, owner: Callable[[set[str]], Awaitable[RouteResponse]], path: str, payload: dict,
                    exclude: Collection[str] = ()) -> Upstream:
        """POST to the owner, as a stream. A worker that cannot be reached, or that answers that it
        is draining or not ready, is left out and the owner asked for again."""
        excluded = set(exclude)
        failure = "no worker could be reached"
        for attempt in range(NUM_ATTEMPTS):
            if attempt:
                self.metrics.upstream_retries.inc()
            route = await owner(excluded)
            body = _for_worker(payload, route)
            try:
                request = self._client.build_request("POST", route.address.rstrip("/") + path, json=body)
                response = await self._client.send(request, stream=True)
            except _UNREACHABLE as exc:
                failure = f"worker {route.worker_id} unreachable: {describe(exc)}"
            except httpx.PoolTimeout as exc:
                raise Unavailable("gateway has no free upstream connection") from exc
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                raise UpstreamError(f"worker {route.worker_id} failed before answering: {describe(exc)}") from exc
            else:
                reason = await _reroute_reason(response)
                if reason is None:
                    return Upstream(response, route, body)
                failure = f"worker {route.worker_id}: {reason}"
            excluded.add(route.worker_id)
        raise Unavailable(failure, retry_after_s=1)

    async def _next_in_turn(self, excluded: set[str]) -> RouteResponse:
        active = [w for w in await self._cached_workers()
                  if w.get("state") == "active" and isinstance(w.get("address"), str)
                  and w["worker_id"] not in excluded]
        if not active:
            raise Unavailable("no worker available", retry_after_s=1)
        worker = active[next(self._turns) % len(active)]
        return RouteResponse(seq_id="", worker_id=worker["worker_id"], address=worker["address"], epoch=0)

    async def _cached_workers(self) -> list[dict]:
        """The coordinator's worker list, at most WORKERS_TTL_S old (asked once per request otherwise)."""
        fetched_s, workers = self._workers
        if time.monotonic() - fetched_s >= WORKERS_TTL_S:
            workers = await self._coordinator.workers()
            self._workers = (time.monotonic(), workers)
        return workers

    async def _delete_at(self, address: Any, path: str) -> JSONResponse | None:
        if not isinstance(address, str):
            return None
        try:
            response = await self._client.send(
                self._client.build_request("DELETE", address.rstrip("/") + path), stream=True)
            return await relay_json(response)
        except (httpx.HTTPError, httpx.InvalidURL, ServiceError):
            return None  # a worker that is gone holds no KV

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


def _for_worker(payload: dict, route: RouteResponse) -> dict:
    """A fresh request id per attempt (a session's turn id), and a session's handoff sources."""
    body = payload | {"request_id": uuid.uuid4().hex}
    if "seq_id" in payload:
        body["handoff_sources"] = [ref.model_dump() for ref in route.previous]
    return body


async def _reroute_reason(response: httpx.Response) -> str | None:
    """Why a worker's answer means "ask the next owner" (draining, not ready), or None. Reads the
    body of a 503 only; relay_json reuses it."""
    if response.status_code != 503:
        return None
    try:
        body = json_or_none(await response.aread())
    except httpx.HTTPError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("type") in _REROUTE_ERRORS:
        return str(error.get("message") or error["type"])
    return None


class StreamRelay:
    """One client stream over one or more worker streams: when a worker's stream breaks, the rest
    of the turn is asked of the sequence's new owner (resume: the tokens already sent), and the
    client sees one uninterrupted stream with one start and exactly one terminal event."""

    def __init__(self, proxy: GatewayProxy, upstream: Upstream, metrics: GatewayMetrics,
                 started_s: float) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.metrics = metrics
        self.started_s = started_s
        self.start: dict | None = None
        self.token_ids: list[int] = []

    async def encoded(self) -> AsyncIterator[bytes]:
        outcome, last_event = "client_disconnect", None
        self.metrics.active_streams.inc()
        try:
            async with aclosing(self.events()) as events:
                async for event in events:
                    if last_event is None:
                        self.metrics.ttfb_s.observe(time.perf_counter() - self.started_s)
                    last_event = event
                    yield encode_event(event)
            outcome = stream_outcome(last_event)
        finally:
            self.metrics.active_streams.dec()
            self.metrics.streams.labels(outcome).inc()

    async def events(self) -> AsyncIterator[dict]:
        migrations = 0
        while True:
            try:
                async for event in self._relay_one():
                    yield event
                return
            except StreamBroken as exc:
                if migrations >= self.proxy.migration_limit:
                    yield upstream_error_event(str(exc))
                    return
                migrations += 1
                failure = await self._migrate()
                if failure is not None:
                    yield failure
                    return

    async def _relay_one(self) -> AsyncIterator[dict]:
        async for event in worker_events(self.upstream.response):
            if event["type"] == "start":
                if self.start is not None:
                    continue  # a migrated turn's second start: the client has one already
                self.start = event
            elif event["type"] == "token":
                self.token_ids.append(event.get("token_id"))
            yield event

    async def _migrate(self) -> dict | None:
        """Continue on the new owner; an error event if that is not possible."""
        await self.aclose()
        previous = self.upstream
        payload = previous.payload | {"resume": {
            "turn_id": previous.payload["request_id"],
            "context_tokens": self.start["context_tokens"] if self.start else None,
            "generated_ids": self.token_ids}}
        try:
            upstream = await self.proxy.open_generate(payload, exclude={previous.route.worker_id})
        except ServiceError as exc:
            self.metrics.migrations.labels("failed").inc()
            return upstream_error_event(f"migration failed: {exc.message}", exc.error_type)
        if upstream.response.status_code != 200:
            self.metrics.migrations.labels("failed").inc()
            body = json_or_none(await upstream.response.aread())
            await upstream.response.aclose()
            return upstream_error_event(f"migration failed: {error_message(body) or upstream.response.status_code}")
        self.metrics.migrations.labels("ok").inc()
        self.upstream = upstream
        return None

    async def aclose(self) -> None:
        await close_upstream(self.upstream.response)


async def close_upstream(response: httpx.Response) -> None:
    """Close a worker's response even while the client's request is being cancelled (shielded), so
    the worker sees the disconnect and stops generating."""
    with anyio.CancelScope(shield=True), suppress(httpx.HTTPError):
        await response.aclose()


class ClosingEventStream(EventSourceResponse):
    """SSE to the client that runs `close` (closing the worker's stream) however it ends (done,
    broken, client gone, cancelled), so a client disconnect reaches the worker and it stops."""

    def __init__(self, body: AsyncIterator[bytes], close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(body, sep="\n", headers=headers)
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()
