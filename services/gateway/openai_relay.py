"""One OpenAI-style completion: check the model, route by the conversation's key, and turn the
worker's result or events into OpenAI's body or chunks.

A stateless request is not migrated when its worker's stream breaks: the client holds the whole
conversation and sees an error chunk (never a silently shortened answer), so it can retry.
"""

import time
from collections.abc import AsyncIterator
from functools import partial

from starlette.responses import JSONResponse, Response

from services.common.errors import HTTPStatusError, ModelNotFound, UpstreamError
from services.common.event_stream import EventStream, FinalChunk
from services.common.schemas import WorkerCompletionRequest
from services.common.sse import encode_event
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_format import DONE_LINE, Reply, openai_error_body
from services.gateway.proxy import (GatewayProxy, StreamBroken, Upstream, close_upstream,
                                    read_result, worker_events)
from services.gateway.session_key import SESSION_HEADER


def check_model(proxy: GatewayProxy, model: str) -> None:
    served = proxy.served_models()
    if model not in served:
        names = ", ".join(sorted(served)) or "none (no worker is registered)"
        raise ModelNotFound(f"model '{model}' is not served here; served: {names}", param="model")


async def complete(proxy: GatewayProxy, reply: Reply, request: WorkerCompletionRequest, key: str) -> Response:
    started_s = time.perf_counter()
    check_model(proxy, reply.model)
    upstream = await proxy.open_completion(key, request.model_dump(exclude_none=True))
    headers = {SESSION_HEADER: key}
    if not request.stream or upstream.response.status != 200:
        result = await read_result(upstream.response)  # raises the worker's error
        proxy.metrics.ttfb_s.observe(time.perf_counter() - started_s)
        return JSONResponse(reply.result(result), headers=headers)
    chunks = ChunkRelay(upstream, reply, proxy.metrics, started_s)
    return EventStream(chunks.encoded(), headers=headers, close=partial(close_upstream, upstream.response))


class ChunkRelay:
    """The worker's start/token/done events as OpenAI chunks, then `data: [DONE]`. A worker error
    event or a broken stream becomes one `{"error": ...}` chunk (what the openai SDK raises)."""

    def __init__(self, upstream: Upstream, reply: Reply, metrics: GatewayMetrics, started_s: float) -> None:
        self.upstream = upstream
        self.reply = reply
        self.metrics = metrics
        self.started_s = started_s

    async def encoded(self) -> AsyncIterator[bytes]:
        outcome = "client_disconnect"
        self.metrics.active_streams.inc()
        try:
            ending = []  # the terminal event's chunks go out with [DONE], in the response's last write
            async for chunk, outcome in self._chunks():
                if outcome == "client_disconnect":  # not the stream's end yet
                    yield encode_event(chunk)
                else:
                    ending.append(encode_event(chunk))
            yield FinalChunk(b"".join(ending) + DONE_LINE)
        finally:
            self.metrics.active_streams.dec()
            self.metrics.streams.labels(outcome).inc()

    async def _chunks(self) -> AsyncIterator[tuple[dict, str]]:
        """(chunk, the stream's outcome if it ended here)."""
        try:
            async for event in worker_events(self.upstream.response):
                for chunk in self._translate(event):
                    yield chunk, event["type"] if event["type"] in ("done", "error") else "client_disconnect"
        except StreamBroken as exc:
            yield openai_error_body(UpstreamError(str(exc))), "upstream_error"

    def _translate(self, event: dict) -> list[dict]:
        kind, reply = event["type"], self.reply
        if kind == "start":
            self.metrics.ttfb_s.observe(time.perf_counter() - self.started_s)
            opening = reply.opening_chunk()
            return [opening] if opening else []
        if kind == "token":
            text = event.get("token")
            return [reply.text_chunk(text)] if isinstance(text, str) and text else []
        if kind == "done":
            final = [reply.final_chunk(event["finish_reason"])]
            return final + ([reply.usage_chunk(event["usage"])] if reply.include_usage else [])
        if kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            failure = HTTPStatusError(500, str(error.get("type") or "internal_error"),
                                      str(error.get("message") or "worker error"))
            return [openai_error_body(failure)]
        return []

