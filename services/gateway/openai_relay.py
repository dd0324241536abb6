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
from services.gateway.openai_format import DONE_LINE, Reply, openai_error_body, worker_choices
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
    upstream = await proxy.open_completion(key, request.model_dump(exclude_none=True, exclude_defaults=True))
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
        self.usage: dict = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}  # so far
        self.offsets: dict[int, int] = {}  # choice -> its text's length in logprobs tokens so far
        self.echoed: set[int] = set()
        self.prompt_entries: list[dict] | None = None

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
            self.metrics.stream_outcomes[outcome].inc()

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
            self.usage = {"prompt_tokens": event.get("context_tokens", 0),
                          "cached_tokens": event.get("cached_tokens", 0), "completion_tokens": 0}
            return [chunk for i in range(reply.n) if (chunk := reply.opening_chunk(i, self.usage)) is not None]
        if kind == "token":
            return self._token_chunks(event)
        if kind == "done":
            final = [reply.final_chunk(c["finish_reason"], c["index"], usage=self.usage) for c in worker_choices(event)]
            return final + ([reply.usage_chunk(event["usage"])] if reply.include_usage else [])
        if kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            failure = HTTPStatusError(500, str(error.get("type") or "internal_error"),
                                      str(error.get("message") or "worker error"))
            return [openai_error_body(failure)]
        return []

    def _token_chunks(self, event: dict) -> list[dict]:
        """A token's chunk (with its logprobs, when asked for, even if its text is held back),
        after the echoed prompt on a choice's first token."""
        choice, text = event.get("choice", 0), event.get("token")
        text = text if isinstance(text, str) else ""
        self.usage["completion_tokens"] += 1
        chunks = self._echo(choice, event)
        entries = [event["logprobs"]] if self.reply.logprobs and "logprobs" in event else None
        if text or entries is not None:
            offset = self._advance(choice, entries)
            chunks.append(self.reply.text_chunk(text, choice, entries, offset, usage=self.usage))
        return chunks

    def _echo(self, choice: int, event: dict) -> list[dict]:
        prompt = getattr(self.reply, "echo", None)
        if prompt is None or choice in self.echoed:
            return []
        self.echoed.add(choice)
        self.prompt_entries = event.get("prompt_logprobs", self.prompt_entries)  # choice 0's, shared
        entries = self.prompt_entries if self.reply.logprobs else None
        return [self.reply.text_chunk(prompt, choice, entries, self._advance(choice, entries), usage=self.usage)]

    def _advance(self, choice: int, entries: list[dict] | None) -> int:
        """Where `entries`' first token starts in the choice's text (completions' text_offset)."""
        offset = self.offsets.get(choice, 0)
        self.offsets[choice] = offset + sum(len(e["token"]) for e in entries or ())
        return offset
