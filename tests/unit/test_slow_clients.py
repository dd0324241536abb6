"""Slow clients against a real uvicorn server on loopback, configured as every service's
(runner.server_config): a head, a body or a response taken too slowly is cut off.

Each bound below is generous (several times the limit): the tests say "closed", not "closed on
time"."""

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from services.common.body_limit import BodyLimit
from services.common.errors import error_response
from services.common.event_stream import EventStream, FinalChunk
from services.common.runner import server_config
from services.common.settings import ServiceSettings
from tests.support import connect, read_response, read_to_end, wait_until

BOUND_S = 10.0  # closed within this; the limits under test are 0.5-2 s


async def echo_app(scope, receive, send) -> None:
    """Answers the request's body after `delay_s` (?delay_s=... in the query)."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    query = scope["query_string"].decode()
    if query.startswith("delay_s="):
        await asyncio.sleep(float(query.split("=")[1]))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(app, **limits: float) -> Iterator[tuple[int, uvicorn.Server]]:
    settings = ServiceSettings(allow_no_internal_token=True, log_level="warning", **limits)
    sock = socket.socket()
    # Accepted connections inherit it: a few KiB, not the kernel's autotuned MiBs, fill up before
    # uvicorn's transport buffer does (what makes a client that does not read block `send`).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, settings))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server to start", timeout_s=BOUND_S, interval_s=0.02)
    try:
        yield sock.getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(BOUND_S)


def read_until(sock: socket.socket, end: bytes) -> None:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk


def test_a_connection_that_sends_nothing_is_closed():
    with serving(echo_app, header_timeout_s=0.5) as (port, _), connect(port) as sock:
        assert read_to_end(sock) == b""


def test_a_partial_request_head_is_closed():
    with serving(echo_app, header_timeout_s=0.5) as (port, _), connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert read_to_end(sock) == b""


def test_a_partial_head_after_a_kept_alive_request_is_closed():
    """The first byte of the next request stops uvicorn's keep-alive timer: the head timer takes over."""
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    with serving(echo_app, header_timeout_s=0.5) as (port, _), connect(port) as sock:
        sock.sendall(request)
        read_until(sock, b"\r\n\r\nhi")
        time.sleep(1.0)  # idle past the head timeout (within uvicorn's 5 s keep-alive): still served
        sock.sendall(request)
        read_until(sock, b"\r\n\r\nhi")
        sock.sendall(b"G")  # one byte: the parser has begun a message
        assert read_to_end(sock) == b""


def test_a_slow_answer_to_a_complete_head_is_not_cut_off():
    with serving(echo_app, header_timeout_s=0.3) as (port, _), connect(port) as sock:
        sock.sendall(b"POST /?delay_s=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"hi")


def test_a_partial_body_gets_408_in_the_services_error_shape():
    app = BodyLimit(echo_app, max_bytes=1024, timeout_s=0.5, render=lambda _, exc: error_response(exc))
    with serving(app) as (port, _), connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        status, headers, body = read_response(sock)
    assert status == 408 and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["type"] == "request_timeout" and "0.5 s" in error["message"]


def test_a_slow_body_within_the_timeout_is_read():
    app = BodyLimit(echo_app, max_bytes=1024, timeout_s=5, render=lambda _, exc: error_response(exc))
    with serving(app) as (port, _), connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\nab")
        time.sleep(0.5)
        sock.sendall(b"cd")
        status, _, body = read_response(sock)
        assert (status, body) == (200, b"abcd")


class EndlessStream:
    """An SSE app streaming 16 KiB chunks, `num_chunks` of them (None: for ever)."""

    def __init__(self, num_chunks: int | None = None) -> None:
        self.num_chunks = num_chunks
        self.closed = threading.Event()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await EventStream(self._body(), close=self._close)(scope, receive, send)

    async def _body(self):
        sent = 0
        while self.num_chunks is None or sent < self.num_chunks - 1:
            yield b"data: " + b"x" * 16378 + b"\n\n"
            sent += 1
        yield FinalChunk(b"data: end\n\n")

    async def _close(self) -> None:
        self.closed.set()


def test_a_stream_the_client_does_not_read_is_ended_and_closed(caplog):
    caplog.set_level(logging.INFO, logger="services.common.slow_clients")
    app = EndlessStream()
    with serving(app, send_timeout_s=1) as (port, server), connect(port, rcvbuf=4096) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert app.closed.wait(BOUND_S), "the stream's close did not run"
        wait_until(lambda: not server.server_state.connections, "the connection to be dropped",
                   timeout_s=BOUND_S)
        received = read_to_end(sock)  # what the kernel had already taken, then the end
    assert received.startswith(b"HTTP/1.1 200")
    assert "took none of the response for 1.0 s" in caplog.text


def test_a_client_that_reads_with_pauses_shorter_than_the_timeout_gets_the_whole_stream():
    """Longer than send_timeout_s in all, each stall well under it: every stall re-arms the timer."""
    app = EndlessStream(num_chunks=64)  # 1 MiB
    with serving(app, send_timeout_s=2) as (port, _), connect(port, rcvbuf=4096) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received, next_pause = b"", 0
        while chunk := sock.recv(65536):
            received += chunk
            if len(received) >= next_pause:  # 8 pauses of 0.4 s
                time.sleep(0.4)
                next_pause += 128 * 1024
    assert received.endswith(b"data: end\n\n\r\n0\r\n\r\n") and app.closed.is_set()


def test_access_log_is_a_setting():
    on = server_config(echo_app, ServiceSettings(allow_no_internal_token=True))
    off = server_config(echo_app, ServiceSettings(allow_no_internal_token=True, access_log=False))
    assert on.access_log and not off.access_log
