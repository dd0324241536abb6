"""Start a service's app under uvicorn (used by each `python -m services.<name>`)."""

import asyncio
import contextlib
import gc
import logging
import queue
import signal
from collections.abc import Callable, Iterator
from logging.handlers import QueueHandler, QueueListener
from typing import Protocol

import uvicorn
from fastapi import FastAPI

from services.common.settings import SERVER_KEEP_ALIVE_S, ServiceSettings
from services.common.slow_clients import ClientLimits, limited_http_protocol


def configure_logging(level: str) -> Callable[[], None]:
    """Log records are written by a thread of their own; the caller (the event loop's thread)
    only queues them. A write to stderr can block, on a pipe whose reader lags (a container
    runtime's) or a slow disk, and the event loop with it: in the coordinator's churn waves the
    loop was found held 15-32 ms inside a log line's write (README, "Control plane at scale").
    Returns what writes out the queue and stops the writer (idempotent; later lines are written
    directly): the server calls it as it exits."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    records: queue.SimpleQueue = queue.SimpleQueue()
    queued = QueueHandler(records)
    queued.setFormatter(logging.Formatter("%(message)s"))  # the message (and traceback) only: the writer adds the rest
    logging.basicConfig(level=level.upper(), handlers=[queued], force=True)
    listener = QueueListener(records, handler)
    listener.start()

    def flush_and_stop() -> None:
        root = logging.getLogger()
        if queued in root.handlers:  # once
            root.handlers = [handler]  # a line logged from here on (a thread at exit) is written directly
            listener.stop()  # writes what is queued, then ends the thread
    if logging.getLogger().level > logging.DEBUG:
        # httpx logs every call at INFO: a second line per relayed request besides the access
        # log, on the gateway's hot path (and a long-poll line each second)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    return flush_and_stop


class Drainable(Protocol):
    on_drained: Callable[[], None]

    def start_drain(self) -> None: ...


class Server(uvicorn.Server):
    """uvicorn that runs `on_shutdown` (if given) on the event loop as its shutdown begins, before
    it waits for the requests in progress: a long poll can answer then instead of holding the exit."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None] | None = None,
                 on_exit: Callable[[], None] | None = None):
        super().__init__(config)
        self._on_shutdown = on_shutdown
        self._on_exit = on_exit

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn re-raises a captured SIGTERM or SIGINT as it leaves this, and the signal's
        default action ends the process there: `on_exit` runs first (the queued log lines)."""
        with super().capture_signals():
            try:
                yield
            finally:
                if self._on_exit is not None:
                    self._on_exit()

    async def shutdown(self, sockets=None) -> None:
        if self._on_shutdown is not None:
            self._on_shutdown()
        await super().shutdown(sockets)


class DrainingServer(Server):
    """uvicorn, except that SIGTERM starts the app's drain instead of stopping at once; however
    the drain was started, the server exits when it is done. SIGINT (Ctrl-C) stops at once."""

    def __init__(self, config: uvicorn.Config, drainable: Drainable, on_exit: Callable[[], None] | None = None):
        super().__init__(config, on_exit=on_exit)
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
    # log_config None: uvicorn's loggers (its access log among them) go to the root logger's
    # queue too, rather than writing on the loop's thread
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                          access_log=settings.access_log, log_config=None,
                          http=limited_http_protocol(limits), timeout_keep_alive=SERVER_KEEP_ALIVE_S,
                          timeout_graceful_shutdown=10)


def serve(app: FastAPI, settings: ServiceSettings, drainable: Drainable | None = None,
          on_shutdown: Callable[[], None] | None = None) -> None:
    flush_logs = configure_logging(settings.log_level)
    try:
        settings.check_internal_token()
        config = server_config(app, settings)
        server = DrainingServer(config, drainable, flush_logs) if drainable else \
            Server(config, on_shutdown, flush_logs)
        server.run()
    finally:
        flush_logs()
        # The interpreter's last garbage collection walks every object of torch and transformers
        # (~2 s on 2 cores); frozen objects are skipped (exit measured at 0.3 s).
        gc.freeze()
