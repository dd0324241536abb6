"""Bridges the engine thread to one HTTP request: a thread-safe sink feeding an asyncio queue,
and the two ways a request's events leave the worker (an SSE stream, or one JSON result), shared
by /generate and /completions."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Counter

from services.common.errors import ServiceError
from services.common.event_stream import FinalChunk
from services.common.sse import TERMINAL_TYPES, encode_event
from services.worker.engine.engine import Engine
from services.worker.engine.sequence import EventSink, Request, SamplingParams
from services.worker.turns import Turn

T = TypeVar("T")
OnDone = Callable[[dict], Awaitable[dict]]  # may turn `done` into an `error` event
OnClose = Callable[[], Awaitable[None]]


class RequestHandle:
    def __init__(self, engine: Engine, build: Callable[[EventSink], Request]):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False
        self.submitted = False  # abort() before submit() has nothing to abort
        self.request = build(self._sink)

    @classmethod
    def for_turn(cls, engine: Engine, turn: Turn, params: SamplingParams,
                 public_id: str | None = None) -> "RequestHandle":
        return cls(engine, lambda sink: Request(
            seq_id=turn.seq_id, token_ids=turn.token_ids, prompt_tokens=turn.prompt_tokens,
            params=params, sink=sink, resumed=turn.resumed, public_id=public_id))

    @classmethod
    def stateless(cls, engine: Engine, name: str, prompt_ids: list[int], params: SamplingParams) -> "RequestHandle":
        """`name` stands in the events' seq_id field; there is no sequence."""
        return cls(engine, lambda sink: Request(seq_id=name, token_ids=prompt_ids, prompt_tokens=len(prompt_ids),
                                                params=params, sink=sink, stateless=True))

    @property
    def generated_ids(self) -> list[int]:
        """This turn's tokens so far (a migrated turn's resumed ones included)."""
        return list(self.request.generated) or list(self.request.resumed)

    def _sink(self, event: Any) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more

    async def submit(self) -> None:
        """Queue the request, and read its lower-tier KV (off the loop) while it waits."""
        loading = self._engine.tiers is not None
        self.request.loading = loading
        self._engine.submit(self.request)
        self.submitted = True
        if loading:
            await asyncio.to_thread(self._engine.prefetch, self.request)

    async def first_event(self) -> dict:
        """The `start` event; raises the ServiceError that refused the request instead."""
        event = await self._events.get()
        if isinstance(event, ServiceError):
            self.finished = True
            raise event
        return event

    async def events(self):
        while not self.finished:
            event = await self._events.get()
            self.finished = event["type"] in TERMINAL_TYPES
            yield event

    def abort(self) -> None:
        if self.submitted and not self.finished:
            self._engine.abort(self.request)


async def start_request(handle: RequestHandle) -> dict:
    """Submit, and wait for `start` (so a refusal is an HTTP error before the first byte); a
    request that does not start is aborted in the engine."""
    try:
        await handle.submit()
        return await handle.first_event()
    except BaseException:
        handle.abort()
        raise


async def counted(outcomes: Counter, started: Awaitable[T]) -> T:
    """Counts the outcome of starting a request: `accepted`, or the refusal's error type."""
    try:
        result = await started
    except ServiceError as exc:
        outcomes.labels(exc.error_type).inc()
        raise
    outcomes.labels("accepted").inc()
    return result


async def _unchanged(event: dict) -> dict:
    return event


async def _nothing() -> None:
    return None


async def stream_events(handle: RequestHandle, start: dict, on_done: OnDone = _unchanged,
                        on_close: OnClose = _nothing) -> AsyncIterator[bytes]:
    """The SSE body. However it ends (done, error, the client went away and the generator is
    closed), the request is aborted in the engine, then `on_close` runs."""
    final = None
    try:
        yield encode_event(start)
        async for event in handle.events():
            if event["type"] == "done":
                event = await on_done(event)
            if event["type"] in TERMINAL_TYPES:
                final = event  # sent after the clean-up, so the client's next turn finds it done
            else:
                yield encode_event(event)
    finally:
        handle.abort()
        await on_close()
    if final is not None:
        yield FinalChunk(encode_event(final))


async def collect_result(handle: RequestHandle, on_done: OnDone = _unchanged, on_close: OnClose = _nothing) -> dict:
    """The `done` event's fields (a `stream: false` body), with the token events' `logprobs` and
    `prompt_logprobs` when asked for (per choice when n > 1); an error event raises instead."""
    logprobs = Logprobs()
    try:
        async for event in handle.events():
            if event["type"] == "token":
                logprobs.add(event)
            if event["type"] == "done":
                event = await on_done(event)
            if event["type"] == "error":
                raise ServiceError(event["error"]["message"])
            if event["type"] == "done":
                return logprobs.attach({k: v for k, v in event.items() if k != "type"})
    finally:
        handle.abort()
        await on_close()
    raise ServiceError("generation ended without a result")


class Logprobs:
    """The logprobs of a request's token events, per choice, for its one JSON result."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[dict]] = {}
        self.prompt: dict[int, list] = {}

    def add(self, event: dict) -> None:
        choice = event.get("choice", 0)
        if "logprobs" in event:
            self.tokens.setdefault(choice, []).append(event["logprobs"])
        if "prompt_logprobs" in event:
            self.prompt[choice] = event["prompt_logprobs"]

    def attach(self, result: dict) -> dict:
        for choice, target in enumerate(result.get("choices") or [result]):
            if choice in self.tokens:
                target["logprobs"] = self.tokens[choice]
            if choice in self.prompt:
                target["prompt_logprobs"] = self.prompt[choice]
        return result
