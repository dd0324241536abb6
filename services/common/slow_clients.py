"""Time limits on slow clients, in uvicorn's HTTP protocol (its httptools one, subclassed).

uvicorn bounds only the silence between two requests of a kept-alive connection
(`timeout_keep_alive`, armed once a response is complete). Measured with uvicorn 0.55 (httptools
and h11 alike): a connection that sends nothing, half a request head, or a head and half its body
stays open indefinitely, and so does one whose client stops reading a response (an app that gives
up on its blocked `send` cannot free it either: uvicorn then closes the transport, which waits for
the unsent bytes to be written). Here:

- head: the request head must be complete `header_timeout_s` after the connection opens, or after
  the first byte of a later request on it; otherwise the connection is closed.
- send: a response whose bytes the client has not taken for `send_timeout_s` (the transport's
  buffer over its high-water mark all that time, so the app's `send` is blocked) is aborted. The
  app sees `http.disconnect`: an EventStream is cancelled as when its client leaves, so its `close`
  runs (a worker frees the request's engine slot).

The body's limit is in BodyLimit (services/common/body_limit.py), which reads every body and can
answer 408 in the service's own error shape. Both timers here cost nothing per request on the
normal path: one timer per connection until its first head is complete, and one per stall.
"""

import asyncio
import logging
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientLimits:
    header_timeout_s: float
    send_timeout_s: float


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    limits: ClassVar[ClientLimits]
    _head_timer: asyncio.TimerHandle | None = None
    _send_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer = _cancel(self._head_timer)
        self._send_timer = _cancel(self._send_timer)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # a later request on a kept-alive connection
            self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def on_headers_complete(self) -> None:
        self._head_timer = _cancel(self._head_timer)
        super().on_headers_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._send_timer = _cancel(self._send_timer)
        super().resume_writing()

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._cut_off(f"no complete request head within {self.limits.header_timeout_s} s")
        self.transport.close()

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self._cut_off(f"it took none of the response for {self.limits.send_timeout_s} s")
        self.transport.abort()  # close() would wait for the unsent bytes

    def _cut_off(self, reason: str) -> None:
        client = "%s:%d" % self.client if self.client else "a client"
        logger.info("closed the connection of %s: %s", client, reason)


def limited_http_protocol(limits: ClientLimits) -> type[asyncio.Protocol]:
    """The protocol class to give uvicorn (`uvicorn.Config(http=...)` takes a class)."""
    return type("LimitedHttpToolsProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()
