"""Graceful exit: leave the ring, finish running requests, serve KV pulls, then deregister.

Started by SIGTERM or POST /internal/drain (the Kubernetes preStop hook); it always ends with
the process exiting (`on_drained`), and the StatefulSet, or the local runner, starts it again.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.worker.engine.engine import Engine
from services.worker.registration import Registration

logger = logging.getLogger(__name__)

POLL_S = 0.1


@dataclass
class DrainStatus:
    draining: bool = False
    drained: bool = False
    started_s: float = 0.0


class Drainer:
    def __init__(self, timeout_s: float, registration: Registration | None):
        self.timeout_s = timeout_s
        self.registration = registration
        self.status = DrainStatus()
        self.on_drained: Callable[[], None] = lambda: None  # set by the server: exit
        self._task: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.status.draining

    def bind(self, engine_source: Callable[[], Engine | None], num_open_turns: Callable[[], int]) -> None:
        self._engine_source = engine_source
        self._num_open_turns = num_open_turns

    def start_drain(self) -> None:
        """Idempotent; call on the event loop."""
        if self._task is None:
            self.status = DrainStatus(draining=True, started_s=time.monotonic())
            self._task = asyncio.create_task(self._drain(self._engine_source(), self._num_open_turns))

    async def _drain(self, engine: Engine | None, num_open_turns: Callable[[], int]) -> None:
        deadline = time.monotonic() + self.timeout_s
        others = await self.registration.drain() if self.registration else 0
        logger.info("draining: left the ring; %s other workers remain", others)
        await _until(lambda: num_open_turns() == 0 and _idle(engine), deadline)
        if others and engine is not None:  # someone may pull our KV: wait until all is taken
            await _until(lambda: engine.num_cached_sequences() == 0, deadline)
        left = engine.num_cached_sequences() if engine else 0
        if left and engine.tiers is not None:  # the shared tier keeps what nobody pulled
            await asyncio.to_thread(engine.write_behind_all)
            flushed = await asyncio.to_thread(engine.tiers.flush, max(0.0, deadline - time.monotonic()))
            logger.info("wrote the KV nobody pulled to the shared tier%s", "" if flushed else " (partly: timeout)")
        logger.info("drained in %.1f s; %d sequences' KV not pulled (their next owners load it from the shared tier, or recompute)",
                    time.monotonic() - self.status.started_s, left)
        if self.registration:
            await self.registration.deregister()
        self.status.drained = True
        self.on_drained()


def _idle(engine: Engine | None) -> bool:
    if engine is None:
        return True
    stats = engine.stats()
    return stats["running"] == 0 and stats["waiting"] == 0


async def _until(predicate: Callable[[], bool], deadline: float) -> None:
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(POLL_S)
