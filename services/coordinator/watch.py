"""Long-poll support: handlers wait until the membership's version moves past what a caller has.
Asyncio only, no framework: notify() is called from the event loop (routes, the sweep task)."""

import asyncio
from contextlib import suppress


class VersionWatch:
    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def notify(self, _version: int | None = None) -> None:
        """Wakes every waiter; later waiters wait for the next change."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        """Until the next notify() or `timeout_s`, whichever comes first."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)
