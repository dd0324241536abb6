"""How long the event loop was held: a task sleeps TICK_S at a time and records how late it woke.
A late wake-up is time no request, long poll or heartbeat on this loop could run."""

import asyncio
import time

from prometheus_client import Gauge

TICK_S = 0.01
HELP = "Longest time the event loop was held (a 10 ms timer's lateness) since start."


class LoopStallMonitor:
    def __init__(self, gauge: Gauge) -> None:
        self.max_stall_s = 0.0
        self._gauge = gauge

    async def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            stall = time.perf_counter() - t0 - TICK_S
            if stall > self.max_stall_s:
                self.max_stall_s = stall
                self._gauge.set(stall)
