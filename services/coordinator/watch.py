"""Long-poll support: handlers wait until the membership's version moves past what a caller has.
Asyncio only, no framework: notify() is called from the event loop (routes, the sweep task)."""

import asyncio
from contextlib import suppress


class VersionWatch:
    def __init__(self) -> None:
        self._changed = asyncio.Event()
        self._closed = False

    def notify(self, _version: int | None = None) -> None:
        """Wakes every waiter; later waiters wait for the next change."""
        self._changed.set()
        if not self._closed:
            self._changed = asyncio.Event()

    def close(self) -> None:
        """The server is stopping: every waiter answers now, and later waits return at once
        (a server waits for requests in progress before it exits)."""
        self._closed = True
        self._changed.set()

    async def wait(self, timeout_s: float) -> None:
        """Until the next notify(), close() or `timeout_s`, whichever comes first."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
