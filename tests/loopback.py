"""An ASGI app served by uvicorn on 127.0.0.1 inside the test's event loop: the fake peers of the
gateway's in-process tests (its client, aiohttp's, speaks real HTTP only).

It can go down and come back on the same port (refused meanwhile, as a dead worker's port), or
come back resetting every connection once a request arrives (a worker killed as it read one).
Started and stopped without uvicorn's main loop, which polls every 0.1 s and waits to shut down.
"""

import asyncio
import socket

import uvicorn


def _listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def refused_address() -> str:
    """A loopback URL whose port nothing listens on (bound once and closed)."""
    with _listening_socket() as sock:
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class LoopbackServer:
    def __init__(self, app) -> None:
        self.app = app
        self.port = 0
        self._uvicorn: uvicorn.Server | None = None
        self._resetting: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, resetting: bool = False) -> None:
        sock = _listening_socket(self.port)
        self.port = sock.getsockname()[1]
        if resetting:
            self._resetting = await asyncio.start_server(_reset, sock=sock)
            return
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, log_level="warning")
        config.load()
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn.lifespan = config.lifespan_class(config)
        await self._uvicorn.startup(sockets=[sock])

    async def stop(self) -> None:
        """As a killed process: the port refuses, open connections are reset, requests end."""
        if self._resetting is not None:
            self._resetting.close()
            self._resetting = None
        if self._uvicorn is not None:
            server, self._uvicorn = self._uvicorn, None
            for listener in server.servers:
                listener.close()
            for connection in list(server.server_state.connections):
                connection.transport.abort()
            for task in list(server.server_state.tasks):
                task.cancel()
        await asyncio.sleep(0)  # the cancelled requests run their cleanup


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1)
    writer.transport.abort()  # unread bytes: the kernel answers with a reset
