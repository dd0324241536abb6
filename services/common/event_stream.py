"""The SSE response of every service: each chunk of the body is sent as it comes (the head with the
first), `: ping` after `ping_s` of silence (so that proxies and load balancers keep an idle stream
open), counted from the last send, and `close` runs however the stream ends: finished, failed, or
the client gone.

Raw ASGI rather than sse-starlette's EventSourceResponse: that one runs a task group of four tasks
per stream, a measurable share of the gateway's per-request cost. Here one watcher task waits for
the client's disconnect (cancelling the stream at once, so that a worker stops generating for a
client that left) and sends the pings.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

PING = b": ping\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class FinalChunk(bytes):
    """The body's last chunk (its terminal event): sent with the end of the response, in one write
    under uvicorn's httptools protocol instead of two."""


class EventStream(StreamingResponse):
    def __init__(self, body: AsyncIterator[bytes], *, headers: dict[str, str] | None = None,
                 close: Callable[[], Awaitable[None]] | None = None, ping_s: float = 15.0) -> None:
        super().__init__(body, headers=HEADERS | (headers or {}), media_type="text/event-stream")
        self._close = close
        self._ping_s = ping_s
        self._streaming = False
        self._client_gone = False
        self._head_sent = False
        self._sent_at = 0.0
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        self._streaming = True
        self._sent_at = time.monotonic()
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, send, task))
        try:
            last = b""
            async for chunk in self.body_iterator:
                if isinstance(chunk, FinalChunk):
                    last = chunk
                    break
                await self._send(send, {"type": "http.response.body", "body": chunk, "more_body": True})
            self._streaming = False
            await self._send(send, {"type": "http.response.body", "body": last, "more_body": False})
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
            task.uncancel()  # our own cancellation: the client left, which ends the response
        finally:
            self._streaming = False
            watcher.cancel()
            await _aclose(self.body_iterator)
            if self._close is not None:
                await self._close()

    async def _send(self, send: Send, message: dict) -> None:
        async with self._lock:  # a ping never lands inside another message
            await self._send_locked(send, message)

    async def _send_locked(self, send: Send, message: dict) -> None:
        """The head goes with the first message: the two writes back to back, so that a reader
        (a gateway relaying a worker's stream, a client) wakes once for the head and the first
        event, not twice (they left 0.2-0.4 ms apart before, the body's first step between them)."""
        self._sent_at = time.monotonic()
        if not self._head_sent:
            self._head_sent = True
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send(message)

    async def _ping(self, send: Send) -> None:
        async with self._lock:  # checked under the lock: the stream may have ended meanwhile
            if self._streaming and time.monotonic() - self._sent_at >= self._ping_s:
                await self._send_locked(send, {"type": "http.response.body", "body": PING, "more_body": True})

    async def _watch(self, receive: Receive, send: Send, streaming: asyncio.Task) -> None:
        while self._streaming:
            # until ping_s after the last send (not after the last check: pings would then come
            # up to twice ping_s apart)
            wait_s = max(0.0, self._sent_at + self._ping_s - time.monotonic())
            try:
                async with asyncio.timeout(wait_s):
                    message = await receive()
            except TimeoutError:
                await self._ping(send)
                continue
            if message["type"] == "http.disconnect":
                if self._streaming:
                    self._client_gone = True
                    streaming.cancel()
                return


async def _aclose(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
