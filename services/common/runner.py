"""Start a service's app under uvicorn (used by each `python -m services.<name>`)."""

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Protocol

import uvicorn
from fastapi import FastAPI

from services.common.settings import ServiceSettings


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Drainable(Protocol):
    on_drained: Callable[[], None]

    def start_drain(self) -> None: ...


class DrainingServer(uvicorn.Server):
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


def serve(app: FastAPI, settings: ServiceSettings, drainable: Drainable | None = None) -> None:
    configure_logging(settings.log_level)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=10)
    server = DrainingServer(config, drainable) if drainable else uvicorn.Server(config)
    server.run()
