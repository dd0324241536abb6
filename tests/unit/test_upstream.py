"""The gateway's upstream client (aiohttp) against scripted HTTP/1.1 servers on loopback
(asyncio.start_server), so that each way a peer can behave is exact: which failure each outcome
is (the proxy's re-send rule depends on it), the per-peer limit, idle expiry, timeouts, framing."""

import asyncio
import re
import socket
from contextlib import asynccontextmanager

import pytest

from services.gateway.upstream import (Disconnected, Saturated, UpstreamClient, UpstreamFailure, Unreachable,
                                       _socket_with_keepalive)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
WAIT_S = 5.0  # guards against a hung test only


class Script:
    """A loopback server running `handler(connection_no, reader, writer)` per connection; counts
    connections and the requests read with read_request."""

    def __init__(self, handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        request = head + await reader.readexactly(int(length.group(1)) if length else 0)
        self.requests.append(request)
        return request

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            await self.handler(self, self.connections, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve(handler):
    script = Script(handler)
    server = await asyncio.start_server(script._serve, "127.0.0.1", 0)
    script.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield script
    finally:
        server.close()


async def answer_ok(script: Script, _, reader, writer) -> None:
    """Keep-alive: OK to every request on the connection."""
    while True:
        await script.read_request(reader)
        writer.write(OK)
        await writer.drain()


@asynccontextmanager
async def client(**options):
    upstream = UpstreamClient(**({"connect_timeout_s": 1.0, "read_timeout_s": WAIT_S} | options))
    try:
        yield upstream
    finally:
        await upstream.close()


async def test_a_response_body_is_read_and_the_connection_reused():
    async with serve(answer_ok) as script, client(headers={"Authorization": "Bearer t"}) as http:
        for _ in range(3):
            response = await http.post_json(script.url + "/generate", {"a": 1})
            assert response.status == 200 and await response.read() == b"ok"
    assert script.connections == 1
    assert script.requests[0].startswith(b"POST /generate HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer t\r\n" in script.requests[0] and script.requests[0].endswith(b'{"a":1}')


async def test_a_peer_with_every_connection_in_use_saturates_only_itself():
    async def stream_forever(script, _, reader, writer):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await asyncio.Event().wait()

    async with serve(stream_forever) as busy, serve(answer_ok) as other, \
            client(max_connections_per_peer=1, connection_wait_s=0.05) as http:
        held = await http.request("GET", busy.url)
        with pytest.raises(Saturated, match="all 1 connections to 127.0.0.1:"):
            await http.request("GET", busy.url)
        assert (await (await http.request("GET", other.url)).read()) == b"ok"  # another peer
        held.close()
        again = await http.request("GET", busy.url)  # the slot came back
        again.close()
    assert busy.connections == 2  # the unfinished body's connection was closed, not pooled


async def test_a_refused_connection_and_a_connect_timeout_are_unreachable():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    async with client() as http:
        with pytest.raises(Unreachable):  # nothing listens
            await http.request("GET", f"http://127.0.0.1:{port}/")
    listener.listen(0)  # a backlog already full: a connection never completes
    fillers = [socket.socket() for _ in range(2)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
    try:
        async with client(connect_timeout_s=0.2) as http:
            with pytest.raises(Unreachable, match="ConnectionTimeoutError"):
                await http.request("GET", f"http://127.0.0.1:{port}/")
    finally:
        for sock in (*fillers, listener):
            sock.close()


async def test_a_reset_after_the_request_is_disconnected_and_no_post_is_resent():
    """A kept-alive connection reset under the second request: the peer may have seen it."""
    async def one_then_reset(script, _, reader, writer):
        await script.read_request(reader)
        writer.write(OK)
        await script.read_request(reader)
        writer.transport.abort()

    async with serve(one_then_reset) as script, client() as http:
        assert await (await http.post_json(script.url, {})).read() == b"ok"
        with pytest.raises(Disconnected):
            await http.post_json(script.url, {})
    assert len(script.requests) == 2 and script.connections == 1  # not sent again


async def test_no_answer_within_the_read_timeout_is_neither_unreachable_nor_disconnected():
    async def never_answer(script, _, reader, writer):
        await script.read_request(reader)
        await asyncio.Event().wait()

    async with serve(never_answer) as script, client(read_timeout_s=0.2) as http:
        with pytest.raises(UpstreamFailure, match="SocketTimeoutError") as failure:
            await http.post_json(script.url, {})
    assert not isinstance(failure.value, (Unreachable, Disconnected))  # the worker may be working


async def test_a_stream_that_goes_silent_fails_after_the_read_timeout():
    async def one_chunk(script, _, reader, writer):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await asyncio.Event().wait()

    async with serve(one_chunk) as script, client(read_timeout_s=0.2) as http:
        response = await http.request("GET", script.url)
        chunks = response.chunks()
        assert await anext(chunks) == b"hi"
        with pytest.raises(UpstreamFailure, match="SocketTimeoutError"):
            await anext(chunks)
        response.close()


async def test_idle_connections_expire_before_the_peers_keepalive():
    async with serve(answer_ok) as script, client(keepalive_expiry_s=0.2) as http:
        for pause_s in (0, 0.05, 0.3):
            await asyncio.sleep(pause_s)
            await (await http.request("GET", script.url)).read()
    assert script.connections == 2  # reused after 0.05 s idle, not after 0.3 s


def test_connections_probe_a_silent_peer_with_tcp_keepalive():
    """A peer whose host vanished never closes its connections; the kernel's probes fail them."""
    sock = _socket_with_keepalive(7, (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ()))
    with sock:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        if hasattr(socket, "TCP_KEEPIDLE"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3


async def test_bodiless_answers_with_a_chunked_header_end_at_once():
    async def bodiless(script, _, reader, writer):
        while True:
            request = await script.read_request(reader)
            status = b"200 OK" if request.startswith(b"HEAD") else b"204 No Content"
            writer.write(b"HTTP/1.1 " + status + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()

    async with serve(bodiless) as script, client() as http:
        async with asyncio.timeout(WAIT_S):
            for method in ("HEAD", "DELETE", "GET"):
                assert await (await http.request(method, script.url)).read() == b""
    assert len(script.requests) == 3 and script.connections == 1


@pytest.mark.parametrize("body", [b"zz\r\nhi\r\n0\r\n\r\n", b"2\r\nhiX\r\n0\r\n\r\n"], ids=["size", "data"])
async def test_an_invalid_chunk_fails_the_body(body):
    async def malformed(script, _, reader, writer):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        await writer.drain()
        await reader.read()

    async with serve(malformed) as script, client() as http:
        with pytest.raises(UpstreamFailure) as failure:  # with the head, if the bytes came with it
            await (await http.request("GET", script.url)).read()
    assert not isinstance(failure.value, (Unreachable, Disconnected))


async def test_a_header_value_with_a_newline_is_refused_before_sending():
    async with serve(answer_ok) as script, client() as http:
        with pytest.raises(ValueError):
            await http.request("GET", script.url, headers={"X-Turn": "a\r\nX-Injected: 1"})
    assert script.requests == []


async def test_chunks_are_what_each_read_brought():
    """A relay writes each chunk to its client at once: events sent together stay together."""
    async def two_writes(script, _, reader, writer):
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n3\r\ncd\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"3\r\nef\n\r\n0\r\n\r\n")
        await writer.drain()

    async with serve(two_writes) as script, client() as http:
        response = await http.request("GET", script.url)
        assert [chunk async for chunk in response.chunks()] == [b"ab\ncd\n", b"ef\n"]
        response.close()
