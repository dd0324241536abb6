"""How long the event loop was held: a task sleeps TICK_S at a time and records how late it woke.
A late wake-up is time no request, long poll or heartbeat on this loop could run.

Two maxima: the wall-clock lateness, and the part of it the event loop's own thread spent on a
CPU (its thread CPU time over the same interval). The first includes time the operating system
ran other processes instead (on a loaded 2-core machine, 100 ms and more); the second is the
loop's own callbacks. A worker thread holding the GIL would delay the loop without showing in the
second: the services' threads run numpy merges that release it (a merge of 8 M points in a thread
delayed a 5 ms timer by at most 1.3 ms, README "Control plane at scale")."""

import asyncio
import time

from prometheus_client import Gauge

TICK_S = 0.01
HELP = "Longest time the event loop was held (a 10 ms timer's lateness) since start."
BUSY_HELP = ("Longest event-loop stall counting only the time the loop's thread was on a CPU (its "
             "thread CPU time during the stall): the stall its own callbacks caused.")


class LoopStallMonitor:
    def __init__(self, gauge: Gauge, busy_gauge: Gauge) -> None:
        self.max_stall_s = 0.0
        self.max_busy_stall_s = 0.0
        self._gauge = gauge
        self._busy_gauge = busy_gauge

    async def run(self) -> None:
        while True:
            t0, cpu0 = time.perf_counter(), time.thread_time()
            await asyncio.sleep(TICK_S)
            stall = time.perf_counter() - t0 - TICK_S
            if stall > self.max_stall_s:
                self.max_stall_s = stall
                self._gauge.set(stall)
            busy = min(stall, time.thread_time() - cpu0)
            if busy > self.max_busy_stall_s:
                self.max_busy_stall_s = busy
                self._busy_gauge.set(busy)
