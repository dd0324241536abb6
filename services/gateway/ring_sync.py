"""Keeps the gateway's RingView in sync with the coordinator by a long poll on GET /ring: a change
(a join, a drain, a leave, a load report) reaches the gateway within milliseconds, and no request
waits on the coordinator. Each answer is a delta (what changed since this view's versions), applied
in place; a storm is batched, at most one apply per BATCH_S; only a full state (first sync, a
restarted coordinator) builds a view from scratch, in a thread. While the coordinator is down the
gateway routes with its last view; after a restart it keeps that view until the new coordinator
has settled (its workers are back).
"""

import asyncio
import logging
import time
from contextlib import suppress

from services.common.errors import ServiceError, Unavailable
from services.common.schemas import RingState
from services.gateway.placement import LoadEstimates
from services.gateway.ring_view import RingView
from services.gateway.routing import CoordinatorClient

log = logging.getLogger(__name__)

POLL_WAIT_S = 10.0        # how long one long poll waits for a change
RETRY_S = (0.1, 0.25, 0.5, 1.0)  # between failed polls: quickly at first, then once a second
FIRST_SYNC_WAIT_S = 3.0   # start-up waits this long for a first view (then serves 503s until one)
BATCH_S = 0.05            # after applying a change, changes of the next 50 ms wait to go in one batch
SETTLING_POLL_S = 1.0     # how long a poll waits while the coordinator settles (after its restart)


class RingSync:
    def __init__(self, coordinator: CoordinatorClient, loads: LoadEstimates) -> None:
        self.coordinator = coordinator
        self.loads = loads
        self.view: RingView | None = None
        self.synced_at: float | None = None  # monotonic time of the last successful poll
        self.failure: str | None = None      # why the last poll failed; None when it succeeded
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
                "active_workers": view.num_active if view else 0}

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                state = await self._poll()
            except ServiceError as exc:
                if self.failure is None:
                    log.warning("ring sync failed, routing with the last ring: %s", exc.message)
                self.failure = exc.message
                await self._sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
                continue
            if self.failure is not None:
                log.info("ring sync restored (epoch %d)", state.epoch if state else -1)
            failures, self.failure, self.synced_at = 0, None, time.monotonic()
            if state is None:
                continue
            view = self.view
            if view is not None and state.instance == view.instance:
                # Settling ends without a version change: take the flag from every answer, or the
                # polls stay at SETTLING_POLL_S until the next change (the restart long-poll bug).
                view.settling = state.settling
            if view is not None and state.instance == view.instance and \
                    (state.version, state.load_version) == (view.version, view.load_version):
                await self._sleep(RETRY_S[0])  # the poll timed out unchanged; never spin on one that did not wait
                continue
            if not self._accept(state):
                await self._sleep(RETRY_S[-1] / 2)  # its `after` would not wait: do not spin
                continue
            await self._take(state)
            self._first.set()
            await self._sleep(BATCH_S)

    async def _take(self, state: RingState) -> None:
        """A full state builds a new view in a thread; a delta is applied to this one, the merge of
        new workers' points in a thread (numpy releases the GIL while it copies and sorts)."""
        view = self.view
        if state.full or view is None or state.instance != view.instance:
            self.view = await asyncio.to_thread(RingView.of, state)
            self.loads.observe(state.loads, full=True)
            return
        plan = view.plan(state)
        base = view.ring.points
        merged = await asyncio.to_thread(view.ring.merged_with, plan.new) if plan.new else None
        if view.ring.points is not base:  # cannot happen: only this task changes the view
            merged = None
        view.apply(state, plan, merged)
        await view.log.forget_points_off_loop(view.ring)  # workers out of the window: their points go
        self.loads.forget(state.removed)
        self.loads.observe(state.loads, full=False)

    async def _poll(self) -> RingState | None:
        """The next state, or None when woken by refresh_now before it came."""
        view, woken = self.view, self._wake.is_set()
        self._wake.clear()
        if view is not None and not woken:
            args = (view.version, view.log.next_seq, view.load_version, view.instance)
        else:
            args = (-1, 0, -1, "")
        wait_s = POLL_WAIT_S if view is not None and not view.settling else SETTLING_POLL_S
        poll = asyncio.ensure_future(self.coordinator.ring(*args, wait_s=wait_s))
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({poll, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
            if not poll.done():
                poll.cancel()
        return poll.result() if poll.done() and not poll.cancelled() else None

    def _accept(self, state: RingState) -> bool:
        """A restarted coordinator's ring is not taken over a working one until it has settled."""
        view = self.view
        if view is None or not view.num_active or state.instance == view.instance:
            return True
        return not state.settling

    async def _sleep(self, seconds: float) -> None:
        """Until `seconds` pass or refresh_now. Not asyncio.wait_for: on Python 3.11 it swallows a
        cancellation that lands as the wake-up completes, and the gateway's shutdown hung on it."""
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({wake}, timeout=seconds)
        finally:
            wake.cancel()
