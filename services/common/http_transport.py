"""A lean HTTP/1.1 transport for httpx: plain `http://` on asyncio streams, with a keep-alive pool.

Why: on the gateway's hot path (one small POST per turn, then a relayed SSE body) httpcore's
connection machinery cost about 1.2 ms of CPU per relayed request on the 2-core test VM, a sixth
of the gateway's whole cost then (README, scenario 10). This transport does only what the
services' internal calls need: HTTP/1.1, bodies framed by Content-Length, chunked or end of
connection, and httpx's timeouts and exception types, so the callers (retries, re-routes) see
what httpx would raise. Anything else (`https://`) goes to httpx's own transport.

A pooled connection the peer has closed (uvicorn drops idle ones after 5 s) is noticed before
reuse. One that fails before any byte of its response is retried once on a new connection: most
likely the peer closed it while idle as the request went out, and never saw it; a peer that died
instead refuses the new connection, which is the error the caller gets.
"""

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator

import httpx

_HEAD_LIMIT = 64 * 1024  # bytes of status line + headers
_NO_BODY_STATUS = frozenset({204, 304})


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


class _Stale(Exception):
    """A reused connection failed before its response began (see the module's docstring)."""


class LeanTransport(httpx.AsyncBaseTransport):
    def __init__(self, *, max_connections: int = 200, max_keepalive: int = 50) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, int], deque[_Connection]] = defaultdict(deque)
        self._max_keepalive = max_keepalive
        self._fallback: httpx.AsyncHTTPTransport | None = None  # made on first use (an SSL context)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.scheme != "http":
            self._fallback = self._fallback or httpx.AsyncHTTPTransport()
            return await self._fallback.handle_async_request(request)
        timeouts = request.extensions.get("timeout", {})
        body = await _body_of(request)
        await self._acquire_slot(request, timeouts.get("pool"))
        try:
            try:
                return await self._exchange(request, body, timeouts, self._pooled(request.url))
            except _Stale:
                return await self._exchange(request, body, timeouts, None)
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()
        if self._fallback is not None:
            await self._fallback.aclose()

    async def _acquire_slot(self, request: httpx.Request, timeout_s: float | None) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection in the pool", request=request) from None

    def _pooled(self, url: httpx.URL) -> _Connection | None:
        idle = self._idle.get((url.host, url.port or 80))
        while idle:
            connection = idle.pop()
            if connection.usable():
                connection.reused = True
                return connection
            connection.close()
        return None

    def _finished(self, url: httpx.URL, connection: _Connection, reusable: bool) -> None:
        """A response is done with its connection: pooled again if it can be, and its slot freed."""
        idle = self._idle[(url.host, url.port or 80)]
        if reusable and connection.usable() and len(idle) < self._max_keepalive:
            idle.append(connection)
        else:
            connection.close()
        self._slots.release()

    async def _exchange(self, request: httpx.Request, body: bytes, timeouts: dict,
                        connection: _Connection | None) -> httpx.Response:
        if connection is None:
            connection = await _connect(request, timeouts.get("connect"))
        try:
            await _write(connection, request, body, timeouts.get("write"))
            status, headers = await _read_head(connection, request, timeouts.get("read"))
        except BaseException as exc:
            connection.close()
            if connection.reused and isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
                raise _Stale from exc
            raise
        stream = _Body(self, connection, request, status, headers, timeouts.get("read"))
        return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})


async def _body_of(request: httpx.Request) -> bytes:
    try:
        return request.content
    except httpx.RequestNotRead:
        return await request.aread()


async def _connect(request: httpx.Request, timeout_s: float | None) -> _Connection:
    url = request.url
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(url.host, url.port or 80, limit=_HEAD_LIMIT)
    except TimeoutError:
        raise httpx.ConnectTimeout(f"connecting to {url.host}:{url.port} timed out", request=request) from None
    except OSError as exc:
        raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from exc
    return _Connection(reader, writer)


async def _write(connection: _Connection, request: httpx.Request, body: bytes, timeout_s: float | None) -> None:
    target = request.url.raw_path
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    chunked = False
    for name, value in request.headers.raw:
        if name.lower() == b"transfer-encoding":
            chunked = True
            continue
        lines.append(name + b": " + value)
    if chunked:  # our whole body is at hand: send it with a length instead
        lines.append(b"Content-Length: " + str(len(body)).encode())
    connection.writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    try:
        async with asyncio.timeout(timeout_s):
            await connection.writer.drain()
    except TimeoutError:
        raise httpx.WriteTimeout("writing the request timed out", request=request) from None
    except OSError as exc:
        raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from exc


async def _read_head(connection: _Connection, request: httpx.Request,
                     timeout_s: float | None) -> tuple[int, list[tuple[bytes, bytes]]]:
    while True:
        head = await _read(request, timeout_s, connection.reader.readuntil(b"\r\n\r\n"),
                           "server disconnected without sending a response")
        status, headers = _parse_head(head, request)
        if not 100 <= status < 200:
            return status, headers


def _parse_head(head: bytes, request: httpx.Request) -> tuple[int, list[tuple[bytes, bytes]]]:
    status_line, *header_lines = head[:-4].split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise httpx.RemoteProtocolError(f"invalid status line {status_line[:80]!r}", request=request)
    headers = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise httpx.RemoteProtocolError(f"invalid header line {line[:80]!r}", request=request)
        headers.append((name.strip(), value.strip()))
    return int(parts[1]), headers


async def _read(request: httpx.Request, timeout_s: float | None, read, eof_message: str) -> bytes:
    """One read off the connection, with httpx's exception for each way it can fail."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read
    except TimeoutError:
        raise httpx.ReadTimeout("reading the response timed out", request=request) from None
    except asyncio.IncompleteReadError:
        raise httpx.RemoteProtocolError(eof_message, request=request) from None
    except asyncio.LimitOverrunError:
        raise httpx.RemoteProtocolError("response line or head too long", request=request) from None
    except (OSError, ValueError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc


def _complete_chunks(buffer: bytes, request: httpx.Request) -> tuple[bytes, bytes, bool]:
    """(the data of the complete chunks at the start of `buffer`, what is left, whether the last
    chunk and its trailers were among them)."""
    parts, at = [], 0
    while (line_end := buffer.find(b"\r\n", at)) >= 0:
        try:
            size = int(buffer[at:line_end].split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise httpx.RemoteProtocolError("invalid chunk size", request=request) from None
        if size == 0:
            trailers_end = line_end if buffer.startswith(b"\r\n", line_end + 2) else buffer.find(b"\r\n\r\n", line_end)
            if trailers_end < 0:
                break
            return b"".join(parts), buffer[trailers_end + 4:], True
        data_end = line_end + 2 + size
        if len(buffer) < data_end + 2:
            break
        parts.append(buffer[line_end + 2:data_end])
        at = data_end + 2
    return b"".join(parts), buffer[at:], False


class _Body(httpx.AsyncByteStream):
    """A response body as it arrives; the connection goes back to the pool when the body was read to
    its end and the server keeps it alive, else it is closed."""

    def __init__(self, transport: LeanTransport, connection: _Connection, request: httpx.Request,
                 status: int, headers: list[tuple[bytes, bytes]], timeout_s: float | None) -> None:
        self._transport = transport
        self._connection = connection
        self._request = request
        self._timeout_s = timeout_s
        fields = {name.lower(): value.lower() for name, value in headers}
        self._keep_alive = fields.get(b"connection") != b"close"
        self._chunked = b"chunked" in fields.get(b"transfer-encoding", b"")
        no_body = request.method == "HEAD" or status in _NO_BODY_STATUS
        length = fields.get(b"content-length")
        self._length = 0 if no_body else int(length) if length is not None and length.isdigit() else None
        if not self._chunked and self._length is None:
            self._keep_alive = False  # the body ends when the connection does
        self._complete = False
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        parts = self._chunks() if self._chunked else self._sized() if self._length is not None else self._to_eof()
        async for part in parts:
            yield part
        self._complete = True

    async def _sized(self) -> AsyncIterator[bytes]:
        left = self._length
        while left:
            part = await self._more(min(left, 65536))
            left -= len(part)
            yield part

    async def _chunks(self) -> AsyncIterator[bytes]:
        """Chunked framing parsed off a buffer, so that one read of the socket (one timeout) yields
        every chunk it completed, joined."""
        buffer = b""
        while True:
            data, buffer, finished = _complete_chunks(buffer, self._request)
            if data:
                yield data
            if finished:
                if buffer:
                    self._keep_alive = False  # bytes past the body's end: do not reuse
                return
            buffer += await self._more()

    async def _more(self, limit: int = 65536) -> bytes:
        part = await self._read(self._connection.reader.read(limit))
        if not part:
            raise httpx.RemoteProtocolError("peer closed the connection before the body's end",
                                            request=self._request)
        return part

    async def _to_eof(self) -> AsyncIterator[bytes]:
        while part := await self._read(self._connection.reader.read(65536)):
            yield part

    def _read(self, read):
        return _read(self._request, self._timeout_s, read, "peer closed the connection before the body's end")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        reusable = self._complete and self._keep_alive
        self._transport._finished(self._request.url, self._connection, reusable)  # noqa: SLF001
