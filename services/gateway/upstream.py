"""The gateway's HTTP client for everything it calls (workers and the coordinator): one
aiohttp.ClientSession, the gateway's only HTTP client library.

Why aiohttp (it replaced a hand-written HTTP/1.1 transport for httpx): its C parser frames bodies
strictly (chunked, Content-Length, HEAD/204/304) and it refuses CR/LF in header values; its pool
limits connections per worker and expires idle ones; and it costs no more CPU per relayed request
(measured at 79-145 µs of client CPU per request, against 94-147 µs for the transport it replaced).

- At most `max_connections_per_peer` requests are open to one worker (host:port) at once, each
  from its send until its response is closed (a stream holds its connection for its whole life).
  One more waits `connection_wait_s` for a slot, then fails with Saturated (the gateway's 503).
- A pooled connection idle for `keepalive_expiry_s` is closed: below the peers' keep-alive
  (uvicorn's), so a request never goes out on a connection the peer is closing.
- TCP keep-alive probes every `tcp_keepalive_s` seconds of silence: a peer whose host vanished
  without closing its connections fails them in about 4 x that, not after the read timeout.
- The client re-sends no POST: which request may be re-sent is the caller's rule (proxy._send),
  told apart by the failure's type. GET and DELETE are idempotent methods, which aiohttp re-sends
  once when a kept-alive connection fails before their answer (RFC 9112, 9.3.1).
"""

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from functools import partial

import aiohttp
from yarl import URL

_TCP_KEEPALIVE_PROBES = 3
_JSON = {"Content-Type": "application/json"}
# What aiohttp raises for a connection or an exchange that failed (timeouts included).
_FAILURES = (aiohttp.ClientError, OSError)


class UpstreamFailure(Exception):
    """No answer, or no whole body, from the peer: its message names aiohttp's error."""

    @classmethod
    def of(cls, exc: BaseException) -> "UpstreamFailure":
        return cls(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


class Unreachable(UpstreamFailure):
    """No connection was made (refused, no such host, connect timeout): the peer cannot have seen
    the request, so any request may be re-sent."""


class Disconnected(UpstreamFailure):
    """The connection broke after the request went out and before the response's head: the peer
    may have seen it (and acted on it)."""


class Saturated(UpstreamFailure):
    """Every connection to the peer stayed in use for the whole wait."""


class UpstreamResponse:
    """A peer's response, its body not read yet. close() (idempotent) gives back its connection (to
    the pool when the body was read to its end, else closed, so that a worker sees the disconnect
    and stops generating) and its slot, then runs the callbacks added with on_close."""

    def __init__(self, response: aiohttp.ClientResponse, release: Callable[[], None]) -> None:
        self._response = response
        self._on_close: list[Callable[[], None]] | None = [release]
        self._body: bytes | None = None
        self.status = response.status
        self.headers = response.headers  # case-insensitive

    def on_close(self, callback: Callable[[], None]) -> None:
        if self._on_close is None:
            callback()
        else:
            self._on_close.append(callback)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, each chunk all that one read of the socket brought (for an event
        stream: every event of that read, which a relay then writes at once)."""
        try:
            async for data in self._response.content.iter_any():
                yield data
        except _FAILURES as exc:
            raise UpstreamFailure.of(exc) from exc

    async def read(self) -> bytes:
        """The whole body (kept: read() again returns it); the response is closed after."""
        if self._body is None:
            try:
                self._body = await self._response.read()
            except _FAILURES as exc:
                raise UpstreamFailure.of(exc) from exc
            finally:
                self.close()
        return self._body

    def close(self) -> None:
        if self._on_close is None:
            return
        callbacks, self._on_close = self._on_close, None
        self._response.release()
        for callback in callbacks:
            callback()


class _Slots:
    """Requests open per peer: at most `limit`; one more waits up to `wait_s` (then Saturated).
    The connector has the same limit per host, but its wait can be bounded only together with
    the TCP connect and ends in the connect timeout's error: counted here first, the connector
    never waits, and saturation has an error of its own."""

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit = limit
        self._wait_s = wait_s
        self._per_peer: dict[str, asyncio.Semaphore] = {}

    async def take(self, peer: str) -> Callable[[], None]:
        """A slot of the peer's; the returned function gives it back (call it once)."""
        slots = self._per_peer.get(peer)
        if slots is None:
            slots = self._per_peer[peer] = asyncio.Semaphore(self.limit)
        if slots.locked():
            try:
                async with asyncio.timeout(self._wait_s):
                    await slots.acquire()
            except TimeoutError:
                raise Saturated(f"all {self.limit} connections to {peer} stayed in use "
                                f"for {self._wait_s:g} s") from None
        else:
            await slots.acquire()  # free: returns without suspending
        return slots.release


class UpstreamClient:
    def __init__(self, *, max_connections_per_peer: int = 512, connection_wait_s: float = 1.0,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 300.0,
                 keepalive_expiry_s: float = 4.0, tcp_keepalive_s: int = 5,
                 headers: dict[str, str] | None = None) -> None:
        """`headers` go on every request (the internal token). Needs a running event loop."""
        self._slots = _Slots(max_connections_per_peer, connection_wait_s)
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=max_connections_per_peer, keepalive_timeout=keepalive_expiry_s,
            socket_factory=partial(_socket_with_keepalive, tcp_keepalive_s))
        # connect: a backstop only (the slots keep the connector from waiting for one)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s,
                                              connect=connect_timeout_s + connection_wait_s)
        # No cookies, and no compressed bodies: a worker's stream is relayed as its bytes.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=headers, cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False, skip_auto_headers=("Accept-Encoding",))

    async def post_json(self, url: str, body: dict) -> UpstreamResponse:
        data = json.dumps(body, separators=(",", ":")).encode()
        return await self.request("POST", url, data=data, headers=_JSON)

    async def request(self, method: str, url: str, *, timeout_s: float | None = None,
                      **kwargs) -> UpstreamResponse:
        """The peer's response, once its head has come; `timeout_s` bounds the whole exchange
        (a short call; a stream's body has only the read timeout, between two reads)."""
        target = URL(url)
        release = await self._slots.take(f"{target.host}:{target.port}")
        timeout = self._timeout if timeout_s is None else aiohttp.ClientTimeout(
            total=timeout_s, sock_connect=self._timeout.sock_connect)
        try:
            response = await self._session.request(method, target, timeout=timeout, **kwargs)
        except BaseException as exc:
            release()
            if isinstance(exc, _FAILURES):
                raise _failure_of(exc) from exc
            raise
        return UpstreamResponse(response, release)

    async def close(self) -> None:
        await self._session.close()


def _failure_of(exc: BaseException) -> UpstreamFailure:
    """The failure of a request that got no response head, by whether the peer may have seen it."""
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return Unreachable.of(exc)
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError)):
        return Disconnected.of(exc)
    return UpstreamFailure.of(exc)  # a read timeout, an invalid response, an invalid URL


def _socket_with_keepalive(idle_s: int, addr_info: tuple) -> socket.socket:
    """A socket for a new connection, with TCP keep-alive: probes after `idle_s` of silence, then
    every `idle_s`; the connection fails when a few go unanswered."""
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux (the deployments); elsewhere the system's timing
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, _TCP_KEEPALIVE_PROBES)
    return sock
