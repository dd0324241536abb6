"""Start a service's app under uvicorn (used by each `python -m services.<name>`)."""

import asyncio
import gc
import logging
import signal
from collections.abc import Callable
from typing import Protocol

import uvicorn
from fastapi import FastAPI

from services.common.settings import SERVER_KEEP_ALIVE_S, ServiceSettings
from services.common.slow_clients import ClientLimits, limited_http_protocol


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        # httpx logs every call at INFO: a second line per relayed request besides the access
        # log, on the gateway's hot path (and a long-poll line each second)
        logging.getLogger("httpx").setLevel(logging.WARNING)


class Drainable(Protocol):
    on_drained: Callable[[], None]

    def start_drain(self) -> None: ...


class Server(uvicorn.Server):
    """uvicorn that runs `on_shutdown` (if given) on the event loop as its shutdown begins, before
    it waits for the requests in progress: a long poll can answer then instead of holding the exit."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None = None):
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()
        await super().shutdown(sockets)


class DrainingServer(Server):
    """uvicorn, except that SIGTERM starts the app's drain instead of stopping at once; however
    the drain was started, the server exits when it is done. SIGINT (Ctrl-C) stops at once."""

    def __init__(self, config: uvicorn.Config, drainable: Drainable):
        super().__init__(config)
        self._drainable = drainable
        drainable.on_drained = self.exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self._loop is not None and not self.should_exit:
            # A signal handler interrupts the loop's thread anywhere: hand over thread-safely.
            self._loop.call_soon_threadsafe(self._drainable.start_drain)
            return
        super().handle_exit(sig, frame)

    def exit(self) -> None:
        self.should_exit = True


def server_config(app: FastAPI, settings: ServiceSettings) -> uvicorn.Config:
    """uvicorn's settings for a service: its address, and its limits on slow clients."""
    limits = ClientLimits(settings.header_timeout_s, settings.send_timeout_s)
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=settings.access_log,
                          http=limited_http_protocol(limits), timeout_keep_alive=SERVER_KEEP_ALIVE_S,
                          timeout_graceful_shutdown=10)


def serve(app: FastAPI, settings: ServiceSettings, drainable: Drainable | None = None,
          on_shutdown: Callable[[], None] | None = None) -> None:
    configure_logging(settings.log_level)
    settings.check_internal_token()
    config = server_config(app, settings)
    server = DrainingServer(config, drainable) if drainable else Server(config, on_shutdown)
    try:
        server.run()
    finally:
        # The interpreter's last garbage collection walks every object of torch and transformers
        # (~2 s on 2 cores); frozen objects are skipped (exit measured at 0.3 s).
        gc.freeze()
