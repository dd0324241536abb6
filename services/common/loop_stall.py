"""How long the event loop was held: a task sleeps TICK_S at a time and records how late it woke.
A late wake-up is time no request, long poll or heartbeat on this loop could run.

Two maxima: the wall-clock lateness, and the part of it the event loop's own thread spent on a
CPU (its thread CPU time over the same interval). The first includes time the operating system
ran other processes instead (on a loaded 2-core machine, 100 ms and more); the second is the
loop's own callbacks. A worker thread holding the GIL would delay the loop without showing in the
second: the services' threads run numpy merges that release it (a merge of 8 M points in a thread
delayed a 5 ms timer by at most 1.3 ms, README "Control plane at scale")."""

import asyncio
import logging
import sys
import threading
import time
import traceback

from prometheus_client import Gauge

log = logging.getLogger(__name__)

TICK_S = 0.01
WATCH_PERIOD_S = 0.005  # how often the watch thread looks (only with log_after_s)
STACK_LIMIT = 16        # innermost frames logged
HELP = "Longest time the event loop was held (a 10 ms timer's lateness) since start."
BUSY_HELP = ("Longest event-loop stall counting only the time the loop's thread was on a CPU (its "
             "thread CPU time during the stall): the stall its own callbacks caused.")


class LoopStallMonitor:
    """`log_after_s` > 0: a thread also logs, once per stall that long, where the loop's thread is
    (its innermost frames): the gauges say how long the loop was held, the log says by what."""

    def __init__(self, gauge: Gauge, busy_gauge: Gauge, log_after_s: float = 0.0) -> None:
        self.max_stall_s = 0.0
        self.max_busy_stall_s = 0.0
        self.log_after_s = log_after_s
        self.stalls_logged = 0
        self._gauge = gauge
        self._busy_gauge = busy_gauge
        self._tick_started = time.perf_counter()

    async def run(self) -> None:
        stop = threading.Event()
        if self.log_after_s > 0:
            threading.Thread(target=self._watch, args=(threading.get_ident(), stop), daemon=True,
                             name="loop-stall-watch").start()
        try:
            await self._measure()
        finally:
            stop.set()

    async def _measure(self) -> None:
        while True:
            t0, cpu0 = time.perf_counter(), time.thread_time()
            self._tick_started = t0
            await asyncio.sleep(TICK_S)
            stall = time.perf_counter() - t0 - TICK_S
            if stall > self.max_stall_s:
                self.max_stall_s = stall
                self._gauge.set(stall)
            busy = min(stall, time.thread_time() - cpu0)
            if busy > self.max_busy_stall_s:
                self.max_busy_stall_s = busy
                self._busy_gauge.set(busy)

    def _watch(self, loop_thread: int, stop: threading.Event) -> None:
        logged = None  # the tick whose stall was logged
        while not stop.wait(WATCH_PERIOD_S):
            started = self._tick_started
            held_s = time.perf_counter() - started - TICK_S
            if held_s < self.log_after_s or started == logged:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is None:
                continue
            logged = started
            self.stalls_logged += 1
            log.warning("event loop held for %.0f ms so far; its thread is in:\n%s", held_s * 1000,
                        "".join(traceback.format_stack(frame, limit=STACK_LIMIT)).rstrip())
