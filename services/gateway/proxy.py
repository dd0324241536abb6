"""Forwarding to a sequence's owner worker: re-route past unreachable or draining workers, relay
JSON or SSE, and migrate a stream whose worker died to the sequence's new owner."""

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastapi.responses import JSONResponse
from starlette.responses import Response

from services.common.errors import (Draining, HTTPStatusError, NotReady, ServiceError, Unavailable, UpstreamError,
                                   error_body)
from services.common.event_stream import EventStream, FinalChunk
from services.common.http import path_segment
from services.common.schemas import RouteResponse
from services.common.sse import TERMINAL_TYPES, data_of, encode_data, event_type
from services.common.hash_ring import EmptyRingError
from services.gateway.metrics import GatewayMetrics
from services.gateway.placement import Placer
from services.gateway.ring_sync import RingSync
from services.gateway.routing import describe, error_message, json_or_none
from services.gateway.upstream import (Disconnected, Saturated, UpstreamClient, UpstreamFailure, UpstreamResponse,
                                       Unreachable)

NUM_ATTEMPTS = 3  # the first try, then re-routes past workers that are unreachable or draining
STATS_TIMEOUT_S = 2.0
FAN_OUT_TIMEOUT_S = 10.0  # a worker's engine lock may be held by a long step under load
DRAIN_AFTER_DONE_S = 0.5  # a worker's body ends right after its terminal event
_EVENT_END = re.compile(rb"\r?\n\r?\n")  # SSE events end with a blank line
# A worker's 503s that mean "not here, ask again": it is leaving, or (re)starting.
_REROUTE_ERRORS = frozenset({Draining.error_type, NotReady.error_type})


class StreamBroken(Exception):
    """The worker's stream ended before its terminal event (the worker died or the link broke)."""


class ServedModel(NamedTuple):
    created: int                # Unix time
    root: str                   # the model the name stands for (WORKER_MODEL_NAME)
    max_model_len: int | None   # its window, in tokens


class RawEvent(NamedTuple):
    """A worker's event as its JSON text, relayed as is; parsed only where its content matters."""

    type: str
    data: str

    def parsed(self) -> dict:
        return json.loads(self.data)


def upstream_error_event(message: str, error_type: str = UpstreamError.error_type) -> RawEvent:
    error = {"type": "error", "error": {"type": error_type, "message": message}}
    return RawEvent("error", json.dumps(error, separators=(",", ":")))


async def worker_event_batches(upstream: UpstreamResponse) -> AsyncIterator[list[RawEvent]]:
    """The worker's events in order, up to its terminal event, in batches: the events of each read
    from the worker, so that a relay writes them to its client at once (a socket write per event
    costs more than the event). Pings are dropped. StreamBroken if there is no terminal event."""
    buffer = b""
    chunks = upstream.chunks()  # bytes: UTF-8 never has a newline inside a character
    try:
        async for chunk in chunks:
            *blocks, buffer = _EVENT_END.split(buffer + chunk)
            batch = []
            for block in blocks:
                data = data_of(block.decode())
                if data is None:
                    continue  # a ping or a field this relay does not use
                kind = event_type(data)
                if kind is None:
                    raise ValueError("event without a type")
                batch.append(RawEvent(kind, data))
                if kind in TERMINAL_TYPES:
                    await _read_to_end(chunks)
                    yield batch
                    return
            if batch:
                yield batch
    except (UpstreamFailure, ValueError) as exc:
        raise StreamBroken(f"worker stream broke: {describe(exc)}") from exc
    raise StreamBroken("worker stream ended without a done or error event")


async def _read_to_end(chunks: AsyncIterator[bytes]) -> None:
    """The rest of a finished stream (its end of body), so that its connection goes back to the
    pool: a response closed before its end costs a new connection to the worker next time."""
    with suppress(TimeoutError, UpstreamFailure):
        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
            async for _ in chunks:
                pass


async def worker_events(upstream: UpstreamResponse) -> AsyncIterator[dict]:
    """The worker's events parsed, one by one (for relays that rewrite them)."""
    async for batch in worker_event_batches(upstream):
        for raw in batch:
            yield _parsed_or_broken(raw)


def stream_outcome(terminal: RawEvent) -> str:
    if terminal.type == "done":
        return "done"
    try:
        error = terminal.parsed().get("error")
    except (ValueError, AttributeError):
        return "error"
    is_ours = isinstance(error, dict) and error.get("type") == UpstreamError.error_type
    return "upstream_error" if is_ours else "error"


async def read_json(upstream: UpstreamResponse) -> tuple[int, dict, str | None]:
    """The worker's status, JSON body and Retry-After; a non-JSON error body becomes our error shape."""
    try:
        content = await upstream.read()  # closes it
    except UpstreamFailure as exc:
        raise UpstreamError(f"worker response broke: {exc}") from exc
    body = json_or_none(content)
    success = 200 <= upstream.status < 300
    if success and (not isinstance(body, dict) or "error" in body):
        raise UpstreamError(f"worker sent an invalid HTTP {upstream.status} body")
    if not success and error_message(body) is None:
        body = error_body(UpstreamError.error_type, f"worker answered HTTP {upstream.status}")
    return upstream.status, body, upstream.headers.get("retry-after")


async def relay_json(upstream: UpstreamResponse) -> JSONResponse:
    status, body, retry_after = await read_json(upstream)
    headers = {"Retry-After": retry_after} if retry_after else None
    return JSONResponse(body, status_code=status, headers=headers)


async def read_result(upstream: UpstreamResponse) -> dict:
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

    response: UpstreamResponse
    route: RouteResponse
    payload: dict | None


class GatewayProxy:
    def __init__(self, client: UpstreamClient, ring: RingSync, placer: Placer, metrics: GatewayMetrics,
                 migration_limit: int = 1) -> None:
        self._client = client
        self.ring = ring
        self.placer = placer
        self.metrics = metrics
        self.migration_limit = migration_limit

    async def generate(self, payload: dict, *, stream: bool) -> Response:
        started_s = time.perf_counter()
        upstream = await self.open_generate(payload)
        if stream and upstream.response.status == 200:
            relay = StreamRelay(self, upstream, self.metrics, started_s)
            return EventStream(relay.encoded(), close=relay.aclose)
        response = await relay_json(upstream.response)
        if response.status_code == 200:
            self.metrics.ttfb_s.observe(time.perf_counter() - started_s)
        return response

    async def open_generate(self, payload: dict, exclude: Collection[str] = (), *,
                            migrating: bool = False) -> Upstream:
        return await self._send(payload["seq_id"], "/generate", payload, exclude, migrating=migrating)

    async def open_completion(self, key: str, payload: dict) -> Upstream:
        """A stateless request, placed by its routing key like a session's turn (affinity: the
        worker that holds the conversation's KV)."""
        return await self._send(key, "/completions", payload)

    def served_models(self) -> dict[str, ServedModel]:
        """Each name clients may use (every active worker's served names) -> the model it names,
        created at the Unix time its longest-serving worker registered."""
        models: dict[str, ServedModel] = {}
        now = time.time()
        for worker in self.ring.current().workers.values():
            if worker.state != "active":
                continue
            created = int(now - worker.age_s)
            for name in worker.model_names():
                known = models.get(name)
                if known is None or created < known.created:
                    models[name] = ServedModel(created, worker.model_name or name, worker.max_model_len)
        return models

    async def call_any(self, path: str, body: dict) -> JSONResponse:
        """POST to one active worker (any: every worker serves the same model), the next one if it
        cannot be reached or is not ready; its JSON answer relayed."""
        workers = [w for w in self.ring.current().workers.values() if w.state == "active"]
        failure = "no worker is active"
        for worker in workers[:NUM_ATTEMPTS]:
            try:
                response = await self._client.post_json(worker.address.rstrip("/") + path, body)
                reason = await _reroute_reason(response)
            except Unreachable as exc:
                failure = f"worker {worker.worker_id} unreachable: {exc}"
                continue
            except UpstreamFailure as exc:
                raise UpstreamError(f"worker {worker.worker_id} failed before answering: {exc}") from exc
            if reason is None:
                return await relay_json(response)
            failure = f"worker {worker.worker_id}: {reason}"
        raise Unavailable(failure, retry_after_s=1)

    async def post_everywhere(self, path: str) -> dict[str, tuple[dict | None, str | None]]:
        """POST (no body) to every registered worker at once: worker id -> (its JSON answer, or
        None and why not)."""
        workers = list(self.ring.current().workers.values())
        answers = await asyncio.gather(*(self._short_call("POST", w.address.rstrip("/") + path, FAN_OUT_TIMEOUT_S)
                                         for w in workers))
        return {w.worker_id: answer for w, answer in zip(workers, answers)}

    async def delete_sequence(self, seq_id: str) -> JSONResponse:
        """Removes the sequence from the session store and from every worker's KV: every worker
        is asked (any of them may hold its KV). 409 if a request runs on it, 404 if unknown."""
        workers = self.ring.current().workers.values()
        path = f"/sequences/{path_segment(seq_id)}"
        answers = await asyncio.gather(*(self._delete_at(w.address, path) for w in workers))
        for status in (409, 503, 200, 404):
            for answer in answers:
                if answer is not None and answer.status_code == status:
                    return answer
        raise Unavailable("no worker could be asked to delete the sequence")

    async def sequence_outcomes(self, seq_id: str, public_seq_id: str) -> JSONResponse:
        """The sequence's length and last turns' outcomes, from any worker that answers (they all
        read the one session store): the owner first. `seq_id` is the cluster's id for it."""
        excluded: set[str] = set()
        failure = "no worker is active"
        for _ in range(NUM_ATTEMPTS):
            try:
                route = self.placer.place(self.ring.current(), seq_id, excluded).route
            except EmptyRingError:
                break
            url = f"{route.address.rstrip('/')}/sequences/{path_segment(seq_id)}"
            try:
                status, body, retry_after = await read_json(await self._client.request("GET", url))
            except (UpstreamFailure, ServiceError) as exc:
                failure = f"worker {route.worker_id}: {exc}"
                excluded.add(route.worker_id)
                continue
            if status == 200:
                body["seq_id"] = public_seq_id
            return JSONResponse(body, status_code=status, headers={"Retry-After": retry_after} if retry_after else None)
        raise Unavailable(failure, retry_after_s=1)

    async def cluster_stats(self) -> dict:
        workers = list(self.ring.current().workers.values())
        results = await asyncio.gather(*(self._worker_stats(w.address) for w in workers))
        per_worker, unreachable = {}, []
        for worker, (stats, failure) in zip(workers, results):
            per_worker[worker.worker_id] = stats if stats is not None else {"error": failure}
            if stats is None:
                unreachable.append(worker.worker_id)
        reachable = [stats for stats, _ in results if stats is not None]
        return {"num_workers": len(workers), "workers": per_worker,
                "totals": sum_numeric(reachable), "unreachable": unreachable}

    async def _send(self, key: str, path: str, payload: dict, exclude: Collection[str] = (), *,
                    migrating: bool = False) -> Upstream:
        """POST to the key's worker (placed on the gateway's own ring), as a stream. A worker that
        cannot be reached, or that answers that it is draining or not ready, is left out, the
        ring refreshed, and the key placed again: the request is re-sent to the next owner if
        the worker cannot have seen it, or if it is a turn with its id (see _resendable)."""
        excluded = set(exclude)
        resendable = _resendable(payload)
        failure = None
        for attempt in range(NUM_ATTEMPTS):
            try:
                route = self._place(key, excluded, migrating)
            except EmptyRingError as exc:
                failure = f"{failure}; no other worker is active" if failure else str(exc)
                break
            if attempt:
                self.metrics.upstream_retries.inc()
            body = _for_worker(payload, route)
            release = self._hold(route.worker_id)
            try:
                response = await self._client.post_json(route.address.rstrip("/") + path, body)
                reason = await _reroute_reason(response)
            except BaseException as exc:
                release()
                if not (isinstance(exc, Unreachable) or resendable and isinstance(exc, Disconnected)):
                    error = _send_error(exc, route.worker_id)
                    if error is None:
                        raise
                    raise error from exc
                failure = f"worker {route.worker_id} unreachable: {exc}"
            else:
                if reason is None:
                    response.on_close(release)
                    return Upstream(response, route, body)
                release()
                failure = f"worker {route.worker_id}: {reason}"
            excluded.add(route.worker_id)
            self.ring.refresh_now()
        raise Unavailable(failure, retry_after_s=1)

    def _place(self, key: str, excluded: set[str], migrating: bool) -> RouteResponse:
        placement = self.placer.place(self.ring.current(), key, excluded)
        self.metrics.decisions["migrated" if migrating else placement.decision].inc()
        return placement.route

    def _hold(self, worker_id: str) -> Callable[[], None]:
        """Counts the request in the worker's load (bounded loads) from now until the returned
        release is called: when its response is closed, or at once if it was never answered."""
        loads = self.placer.loads
        loads.started(worker_id)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                loads.finished(worker_id)

        return release

    async def _delete_at(self, address: str, path: str) -> JSONResponse | None:
        try:
            return await relay_json(await self._client.request("DELETE", address.rstrip("/") + path))
        except (UpstreamFailure, ServiceError):
            return None  # a worker that is gone holds no KV

    async def _worker_stats(self, address: str) -> tuple[dict | None, str | None]:
        return await self._short_call("GET", f"{address.rstrip('/')}/stats", STATS_TIMEOUT_S)

    async def _short_call(self, method: str, url: str, timeout_s: float) -> tuple[dict | None, str | None]:
        """A worker's JSON answer to a short call, or None and why not."""
        try:
            response = await self._client.request(method, url, timeout_s=timeout_s)
            body = json_or_none(await response.read())
        except UpstreamFailure as exc:
            return None, str(exc)
        if response.status != 200 or not isinstance(body, dict):
            return None, error_message(body) or f"HTTP {response.status}"
        return body, None


def _resendable(payload: dict) -> bool:
    """Whether the request may be re-sent after a worker may have seen it: a sequence's turn with
    its id, which the session store runs once (a stateless request only goes to a next worker
    when no connection was made to the first)."""
    return "seq_id" in payload and "request_id" in payload


def _send_error(exc: BaseException, worker_id: str) -> ServiceError | None:
    """What a failure to send means to the client; None for what passes through (cancellation)."""
    if isinstance(exc, Saturated):
        return Unavailable(f"gateway has no free connection to worker {worker_id}: {exc}", retry_after_s=1)
    if isinstance(exc, UpstreamFailure):
        return UpstreamError(f"worker {worker_id} failed before answering: {exc}")
    return None


def _for_worker(payload: dict, route: RouteResponse) -> dict:
    """The payload with a request id (a session's turn id: the caller's, the same for every attempt;
    a stateless request gets one per attempt), and a session's handoff sources."""
    body = payload if "request_id" in payload else payload | {"request_id": uuid.uuid4().hex}
    if "seq_id" in payload:
        body["handoff_sources"] = [ref.model_dump() for ref in route.previous]
    return body


async def _reroute_reason(response: UpstreamResponse) -> str | None:
    """Why a worker's answer means "ask the next owner" (draining, not ready), or None. Reads the
    body of a 503 only; relay_json reuses it."""
    if response.status != 503:
        return None
    try:
        body = json_or_none(await response.read())
    except UpstreamFailure:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and error.get("type") in _REROUTE_ERRORS:
        return str(error.get("message") or error["type"])
    return None


class StreamRelay:
    """One client stream over one or more worker streams: when a worker's stream breaks, the rest
    of the turn is asked of the sequence's new owner (resume: the tokens already sent), and the
    client sees one uninterrupted stream with one start and exactly one terminal event. Events are
    relayed as the worker's bytes; only start and terminal events are parsed."""

    def __init__(self, proxy: GatewayProxy, upstream: Upstream, metrics: GatewayMetrics,
                 started_s: float) -> None:
        self.proxy = proxy
        self.upstream = upstream
        self.metrics = metrics
        self.started_s = started_s
        self.start: dict | None = None
        self.tokens: list[str] = []  # token events' JSON, parsed only if the turn migrates

    async def encoded(self) -> AsyncIterator[bytes]:
        outcome, last = "client_disconnect", None
        self.metrics.active_streams.inc()
        try:
            async with aclosing(self.batches()) as batches:
                async for batch in batches:
                    if last is None:
                        self.metrics.ttfb_s.observe(time.perf_counter() - self.started_s)
                    last = batch[-1]
                    data = b"".join(encode_data(event.data) for event in batch)
                    if last.type in TERMINAL_TYPES:  # batches() ends here
                        outcome = stream_outcome(last)
                        data = FinalChunk(data)
                    yield data
        finally:
            self.metrics.active_streams.dec()
            self.metrics.stream_outcomes[outcome].inc()

    async def batches(self) -> AsyncIterator[list[RawEvent]]:
        migrations = 0
        while True:
            try:
                async for batch in self._relay_one():
                    yield batch
                return
            except StreamBroken as exc:
                if migrations >= self.proxy.migration_limit:
                    yield [upstream_error_event(str(exc))]
                    return
                migrations += 1
                failure = await self._migrate()
                if failure is not None:
                    yield [failure]
                    return

    async def _relay_one(self) -> AsyncIterator[list[RawEvent]]:
        async for batch in worker_event_batches(self.upstream.response):
            kept = []
            for event in batch:
                if event.type == "token":
                    self.tokens.append(event.data)
                elif event.type == "start":
                    if self.start is not None:
                        continue  # a migrated turn's second start: the client has one already
                    self.start = _parsed_or_broken(event)
                kept.append(event)
            if kept:
                yield kept

    async def _migrate(self) -> RawEvent | None:
        """Continue on the new owner; an error event if that is not possible."""
        await self.aclose()
        previous = self.upstream
        try:
            generated_ids = [json.loads(data).get("token_id") for data in self.tokens]
        except (ValueError, AttributeError):
            return upstream_error_event("migration failed: the worker sent an invalid token event")
        payload = previous.payload | {"resume": {
            "turn_id": previous.payload["request_id"],
            "context_tokens": self.start.get("context_tokens") if self.start else None,
            "generated_ids": generated_ids}}
        try:
            upstream = await self.proxy.open_generate(payload, exclude={previous.route.worker_id},
                                                      migrating=True)
        except ServiceError as exc:
            self.metrics.migration_outcomes["failed"].inc()
            return upstream_error_event(f"migration failed: {exc.message}", exc.error_type)
        if upstream.response.status != 200:
            self.metrics.migration_outcomes["failed"].inc()
            try:
                body = json_or_none(await upstream.response.read())
            except UpstreamFailure:
                body = None
            return upstream_error_event(f"migration failed: {error_message(body) or upstream.response.status}")
        self.metrics.migration_outcomes["ok"].inc()
        self.upstream = upstream
        return None

    async def aclose(self) -> None:
        await close_upstream(self.upstream.response)


def _parsed_or_broken(event: RawEvent) -> dict:
    try:
        parsed = event.parsed()
    except ValueError as exc:
        raise StreamBroken(f"worker stream broke: {describe(exc)}") from exc
    if not isinstance(parsed, dict):
        raise StreamBroken("worker stream broke: an event that is not an object")
    return parsed


async def close_upstream(response: UpstreamResponse) -> None:
    """A stream's close hook: an unfinished response's connection is closed, so that the worker
    sees the disconnect and stops generating (at once: nothing here awaits, so a cancellation of
    the client's request cannot stop it)."""
    response.close()
