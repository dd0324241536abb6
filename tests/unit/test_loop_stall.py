"""LoopStallMonitor: a callback that holds the loop shows in both maxima; time the process is not
running (here: blocked in a syscall, as when the OS runs something else) only in the wall one."""

import asyncio
import logging
import threading
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


def spin_here(cpu_seconds: float) -> None:
    """A frame with a name to find in the logged stack."""
    spin(cpu_seconds)


async def test_a_stall_over_the_threshold_logs_the_loops_stack_once(caplog):
    caplog.set_level(logging.WARNING, logger="services.common.loop_stall")
    monitor = LoopStallMonitor(*gauges(), log_after_s=0.05)
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.05)
    spin_here(0.3)
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    [record] = [r for r in caplog.records if "event loop held" in r.getMessage()]
    assert "spin_here" in record.getMessage()  # the callback that held it
    assert monitor.stalls_logged == 1


async def test_without_a_threshold_no_watch_thread_runs():
    task = asyncio.create_task(LoopStallMonitor(*gauges()).run())
    await asyncio.sleep(0.02)
    assert "loop-stall-watch" not in [t.name for t in threading.enumerate()]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
