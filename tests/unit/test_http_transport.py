"""LeanTransport against scripted HTTP/1.1 servers on loopback (asyncio.start_server), so that each
framing and failure the services can meet is produced byte for byte."""

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from services.common.http_transport import LeanTransport, _complete_chunks
from tests.support import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


class Server:
    """Answers each request on a connection with `handler(reader, writer, n)` (n: the request's
    number on that connection) until the handler returns False. Counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + await reader.readexactly(length))
                if not await self.handler(reader, writer, n):
                    break
                n += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def reply(body: bytes, extra: bytes = b"") -> Handler:
    async def handler(_reader, writer, _n) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body)
        await writer.drain()
        return True
    return handler


def client(**timeouts: float) -> httpx.AsyncClient:
    timeout = httpx.Timeout(**({"timeout": 5.0} | timeouts))
    return httpx.AsyncClient(transport=LeanTransport(max_connections=4), timeout=timeout)


async def test_sized_bodies_and_kept_alive_connections():
    server = Server(reply(b'{"ok": true}'))
    async with server as url, client() as http:
        for _ in range(3):
            response = await http.post(url + "/generate", json={"prompt": "hi"})
            assert response.status_code == 200 and response.json() == {"ok": True}
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /generate HTTP/1.1\r\n")
    assert server.requests[0].endswith(b'{"prompt":"hi"}')


async def test_chunked_bodies_arrive_as_sent():
    second = asyncio.Event()

    async def handler(_reader, writer, _n) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
        await writer.drain()
        await second.wait()
        writer.write(b"6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n")
        await writer.drain()
        return True

    server = Server(handler)
    async with server as url, client() as http:
        async with http.stream("GET", url + "/events") as response:
            parts = response.aiter_raw()
            assert await parts.__anext__() == b"hello"  # before the server sent the rest
            second.set()
            assert [part async for part in parts] == [b" world"]
        second.clear()
        task = asyncio.create_task(http.get(url + "/events"))
        await asyncio.sleep(0.05)
        second.set()
        assert (await task).content == b"hello world"
    assert server.connections == 1  # read to its end, the connection was reused


def test_chunk_parsing_across_reads():
    request = httpx.Request("GET", "http://x/")
    whole = b"5\r\nhello\r\n3;x=1\r\nabc\r\n0\r\n\r\n"
    received, buffer, finished = b"", b"", False
    for byte in whole:  # one byte per read: every split point
        buffer += bytes([byte])
        data, buffer, finished = _complete_chunks(buffer, request)
        received += data
    assert (received, buffer, finished) == (b"helloabc", b"", True)
    with pytest.raises(httpx.RemoteProtocolError):
        _complete_chunks(b"zz\r\n", request)


async def test_a_body_closed_before_its_end_is_not_reused():
    server = Server(reply(b"x" * 100_000))
    async with server as url, client() as http:
        async with http.stream("GET", url) as response:
            await response.aiter_raw().__anext__()
        assert (await http.get(url)).content == b"x" * 100_000
    assert server.connections == 2


async def test_a_connection_the_server_closed_is_not_reused():
    server = Server(reply(b"ok", b"Connection: close\r\n"))
    async with server as url, client() as http:
        for _ in range(2):
            assert (await http.get(url)).content == b"ok"
    assert server.connections == 2


async def test_a_kept_alive_connection_that_dies_under_a_request_is_retried_once():
    """The server's idle timeout races our reuse: the request reaches a connection it is
    closing. The peer never answered, so the transport sends it again on a new connection."""
    async def handler(_reader, writer, n) -> bool:
        if n == 1:
            return False  # closes without answering the second request on this connection
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    server = Server(handler)
    async with server as url, client() as http:
        for _ in range(2):
            assert (await http.post(url, json={})).content == b"ok"
    assert server.connections == 2


def answer_and_close(raw: bytes) -> Handler:
    async def handler(_reader, writer, _n) -> bool:
        writer.write(raw)
        await writer.drain()
        return False
    return handler


async def test_a_response_without_length_ends_with_the_connection():
    async with Server(answer_and_close(b"HTTP/1.1 200 OK\r\n\r\nall of it")) as url, client() as http:
        assert (await http.get(url)).content == b"all of it"


async def test_timeouts_and_refused_connections_raise_httpx_exceptions():
    async with client(connect=1.0) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{free_port()}/")

    async def silent(_reader, _writer, _n) -> bool:
        await asyncio.sleep(10)
        return False

    async with Server(silent) as url, client(read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(url)


@pytest.mark.parametrize("raw", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly",  # cut short
                                 b"SMTP ready\r\n\r\n"])  # not HTTP
async def test_a_broken_response_is_a_protocol_error(raw: bytes):
    async with Server(answer_and_close(raw)) as url, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


async def test_the_pool_bounds_open_connections():
    release = asyncio.Event()

    async def slow(_reader, writer, _n) -> bool:
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    transport = LeanTransport(max_connections=1)
    async with Server(slow) as url, httpx.AsyncClient(transport=transport,
                                                      timeout=httpx.Timeout(5.0, pool=0.2)) as http:
        first = asyncio.create_task(http.get(url))
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.PoolTimeout):
            await http.get(url)
        release.set()
        assert (await first).content == b"ok"
        assert (await http.get(url)).content == b"ok"  # its slot came back
