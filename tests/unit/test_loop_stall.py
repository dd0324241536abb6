"""LoopStallMonitor: a callback that holds the loop shows in both maxima; time the process is not
running (here: blocked in a syscall, as when the OS runs something else) only in the wall one."""

import asyncio
import time

from prometheus_client import CollectorRegistry, Gauge

from services.common.loop_stall import LoopStallMonitor


def gauges() -> tuple[Gauge, Gauge]:
    registry = CollectorRegistry()
    return Gauge("stall", "", registry=registry), Gauge("busy", "", registry=registry)


async def run_monitor_while(hold) -> LoopStallMonitor:
    monitor = LoopStallMonitor(*gauges())
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.05)  # a few ticks first
    hold()
    await asyncio.sleep(0.05)
    task.cancel()
    return monitor


def spin(cpu_seconds: float) -> None:
    """Holds the loop for that much CPU time (the wall time is longer on a loaded machine)."""
    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        pass


async def test_a_busy_callback_is_a_busy_stall():
    monitor = await run_monitor_while(lambda: spin(0.15))
    assert monitor.max_stall_s >= 0.14 and monitor.max_busy_stall_s >= 0.14
    assert monitor._busy_gauge._value.get() == monitor.max_busy_stall_s


async def test_a_process_off_the_cpu_is_a_stall_but_not_a_busy_one():
    monitor = await run_monitor_while(lambda: time.sleep(0.15))  # blocks the loop without CPU
    assert monitor.max_stall_s >= 0.14
    assert monitor.max_busy_stall_s < 0.07
