"""Keeps the gateway's RingView in sync with the coordinator by a long poll on GET /ring: a change
(a join, a drain, a leave, a load report) reaches the gateway within milliseconds, and no request
waits on the coordinator. While the coordinator is down the gateway routes with its last view;
after a restart it keeps that view until the new coordinator has settled (its workers are back).
"""

import asyncio
import logging
import time
from contextlib import suppress

from services.common.errors import ServiceError, Unavailable
from services.common.schemas import RingSnapshot
from services.gateway.placement import LoadEstimates
from services.gateway.ring_view import RingCache, RingView
from services.gateway.routing import CoordinatorClient

log = logging.getLogger(__name__)

POLL_WAIT_S = 10.0        # how long one long poll waits for a change
RETRY_S = (0.1, 0.25, 0.5, 1.0)  # between failed polls: quickly at first, then once a second
FIRST_SYNC_WAIT_S = 3.0   # start-up waits this long for a first view (then serves 503s until one)


class RingSync:
    def __init__(self, coordinator: CoordinatorClient, loads: LoadEstimates) -> None:
        self.coordinator = coordinator
        self.loads = loads
        self.view: RingView | None = None
        self.synced_at: float | None = None  # monotonic time of the last successful poll
        self.failure: str | None = None      # why the last poll failed; None when it succeeded
        self._cache = RingCache()
        self._wake = asyncio.Event()
        self._first = asyncio.Event()

    def current(self) -> RingView:
        if self.view is None:
            raise Unavailable(f"gateway has no ring yet: {self.failure or 'first sync pending'}",
                              retry_after_s=1)
        return self.view

    def refresh_now(self) -> None:
        """After a routing failure: poll again at once instead of waiting for a change."""
        self._wake.set()

    async def wait_first(self, timeout_s: float = FIRST_SYNC_WAIT_S) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), timeout_s)

    def health(self) -> dict:
        view = self.view
        age = None if self.synced_at is None else round(time.monotonic() - self.synced_at, 3)
        return {"coordinator": "unreachable" if self.failure else "ok", "error": self.failure,
                "last_sync_age_s": age, "epoch": view.epoch if view else None,
                "version": view.version if view else None,
                "active_workers": len(view.active) if view else 0}

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                snapshot = await self._poll()
            except ServiceError as exc:
                if self.failure is None:
                    log.warning("ring sync failed, routing with the last ring: %s", exc.message)
                self.failure = exc.message
                await self._sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
                continue
            if self.failure is not None:
                log.info("ring sync restored (epoch %d)", snapshot.epoch)
            failures, self.failure, self.synced_at = 0, None, time.monotonic()
            if snapshot is None:
                continue
            if self.view is not None and (snapshot.instance, snapshot.version) == \
                    (self.view.snapshot.instance, self.view.version):
                await self._sleep(RETRY_S[0])  # the poll timed out unchanged; never spin on one that did not wait
                continue
            if not self._accept(snapshot):
                await self._sleep(RETRY_S[-1] / 2)  # its `after` would not wait: do not spin
                continue
            self.view = await asyncio.to_thread(RingView, snapshot, self._cache)
            self.loads.observe(snapshot.workers)
            self._first.set()

    async def _poll(self) -> RingSnapshot | None:
        """The next snapshot, or None when woken by refresh_now before it came."""
        view, woken = self.view, self._wake.is_set()
        self._wake.clear()
        after, instance = (view.version, view.snapshot.instance) if view and not woken else (-1, "")
        wait_s = POLL_WAIT_S if view and view.snapshot.settling is False else 1.0
        poll = asyncio.ensure_future(self.coordinator.ring(after, instance, wait_s))
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({poll, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            if not poll.done():
                poll.cancel()
        return poll.result() if poll.done() and not poll.cancelled() else None

    def _accept(self, snapshot: RingSnapshot) -> bool:
        """A restarted coordinator's ring is not taken over a working one until it has settled."""
        view = self.view
        if view is None or not view.active or snapshot.instance == view.snapshot.instance:
            return True
        return not snapshot.settling

    async def _sleep(self, seconds: float) -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
