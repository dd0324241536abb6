"""create_app(settings): the coordinator's FastAPI app, with a background TTL sweep."""

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import Depends, FastAPI

from services.common.auth import require_bearer
from services.common.burst_pacing import PaceBursts
from services.common.errors import install_error_handlers
from services.common.loop_stall import LoopStallMonitor
from services.common.memory import freeze_startup_objects
from services.coordinator.api import membership_router, router
from services.coordinator.fast_heartbeat import FastHeartbeat
from services.coordinator.kubernetes_membership import KubernetesMembership
from services.coordinator.kubernetes_watch import make_watcher
from services.coordinator.membership import Membership
from services.coordinator.metrics import CoordinatorMetrics
from services.coordinator.settings import CoordinatorSettings
from services.coordinator.watch import VersionWatch

log = logging.getLogger(__name__)

MEMBERSHIP_WRITES = ("/register", "/heartbeat", "/deregister", "/drain")


async def sweep_forever(membership: Membership, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            membership.expire()
            # Points of workers out of the handoff window: an O(points) copy, made in a thread.
            await membership.log.forget_points_off_loop(membership.committed_ring)
        except Exception:  # one bad sweep must not stop expiry for the life of the process
            log.exception("membership sweep failed")


async def build_points_forever(membership: Membership, interval_s: float = 0.05) -> None:
    """Merges the points of workers new to the ring in a thread (numpy copies and sorts without
    the GIL), then commits them on the loop: a storm of joins is one merge per interval, and no
    request waits behind one."""
    while True:
        await asyncio.sleep(interval_s)
        new = membership.pending_new()
        if not new:
            continue
        ring = membership.committed_ring
        base = ring.points
        try:
            merged = await asyncio.to_thread(ring.merged_with, new)
        except Exception:
            log.exception("building ring points failed")
            continue
        if ring.points is base:  # else the window dropped points meanwhile: build again
            membership.commit(merged=(new, merged))


def build_membership(settings: CoordinatorSettings, metrics: CoordinatorMetrics,
                     clock: Callable[[], float], watch: VersionWatch) -> Membership:
    def on_change(change: str, _worker_id: str, epoch: int) -> None:
        metrics.record_change(change, len(membership), membership.num_draining, epoch)

    kind = KubernetesMembership if settings.membership == "kubernetes" else Membership
    membership = kind(ttl_s=settings.ttl_s, vnodes=settings.vnodes, handoff_window_s=settings.handoff_window_s,
                      clock=clock, on_change=on_change, on_version=watch.notify, defer_new_points=True)
    return membership


def create_app(settings: CoordinatorSettings | None = None, *,
               clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """`clock` lets tests drive TTL expiry without sleeping."""
    settings = settings or CoordinatorSettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.metrics = CoordinatorMetrics()
        app.state.watch = VersionWatch()
        app.state.instance = uuid.uuid4().hex
        app.state.started_at = clock()
        app.state.membership = build_membership(settings, app.state.metrics, clock, app.state.watch)
        freeze_startup_objects()  # a full collection was a 46 ms stall at 1000 workers
        stalls = LoopStallMonitor(app.state.metrics.loop_stall, app.state.metrics.loop_busy_stall,
                                  settings.loop_stall_log_ms / 1000)
        # Kubernetes lists the workers: the watch holds the app's one HTTP client.
        watcher = make_watcher(settings, app.state.membership.sync, app.state.metrics.record_watch_restart) \
            if settings.membership == "kubernetes" else None
        tasks = [asyncio.create_task(sweep_forever(app.state.membership, settings.sweep_interval_s)),
                 asyncio.create_task(build_points_forever(app.state.membership)),
                 asyncio.create_task(stalls.run())]
        if watcher is not None:
            tasks.append(asyncio.create_task(watcher.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if watcher is not None:
                await watcher.client.aclose()

    app = FastAPI(title="kvcache coordinator", lifespan=lifespan)
    # A storm of registrations (a restart, a rollout's drains) is served a few per loop iteration.
    app.add_middleware(PaceBursts, paths=MEMBERSHIP_WRITES)
    # Outermost: a heartbeat it answers is a few µs of the loop, not paced (its fallbacks are).
    app.add_middleware(FastHeartbeat, token=settings.internal_token)
    install_error_handlers(app)
    app.include_router(router)
    # Membership writes come only from workers; with a token set, only they can move the ring.
    app.include_router(membership_router,
                       dependencies=[Depends(require_bearer(settings.internal_token))])
    return app
