"""The coordinator's long-poll primitive: waiters wake on a change, and all at once when it stops."""

import asyncio

from services.coordinator.watch import VersionWatch


async def test_notify_wakes_waiters_and_later_waits_wait_for_the_next_change():
    watch = VersionWatch()
    waiter = asyncio.create_task(watch.wait(30))
    await asyncio.sleep(0)
    watch.notify(1)
    await asyncio.wait_for(waiter, 1)
    later = asyncio.create_task(watch.wait(30))
    await asyncio.sleep(0.05)
    assert not later.done()
    later.cancel()


async def test_close_wakes_every_waiter_and_later_waits_return_at_once():
    watch = VersionWatch()
    waiters = [asyncio.create_task(watch.wait(30)) for _ in range(3)]
    await asyncio.sleep(0)
    watch.close()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    watch.notify(2)  # a change after close keeps it closed
    await asyncio.wait_for(watch.wait(30), 1)


async def test_a_wait_ends_at_its_timeout():
    watch = VersionWatch()
    await asyncio.wait_for(watch.wait(0.05), 1)
