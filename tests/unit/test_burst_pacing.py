"""PaceBursts: of a burst of requests that arrive together, at most `per_turn` of the paced paths
run in one event-loop iteration; other paths are not held; every request is served, in order."""

import asyncio

from services.common.burst_pacing import PaceBursts


class IterationClock:
    """Counts event-loop iterations: a task that yields once per iteration."""

    def __init__(self) -> None:
        self.now = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0)
            self.now += 1


async def burst(paths: list[str], per_turn: int) -> tuple[list[tuple[str, int]], list[int]]:
    clock, served = IterationClock(), []

    async def app(scope, receive, send):  # a handler that runs in one step, as the routes do
        served.append((scope["path"], clock.now))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    paced = PaceBursts(app, paths=["/register"], per_turn=per_turn)
    ticker = asyncio.create_task(clock.run())
    statuses: list[int] = []

    async def send(message):
        statuses.append(message["status"])

    await asyncio.gather(*(paced({"type": "http", "path": p}, None, send) for p in paths))
    ticker.cancel()
    return served, statuses


def most_in_one_iteration(served: list[tuple[str, int]], path: str) -> int:
    per_iteration: dict[int, int] = {}
    for p, tick in served:
        if p == path:
            per_iteration[tick] = per_iteration.get(tick, 0) + 1
    return max(per_iteration.values())


async def test_a_burst_is_served_a_few_per_iteration_in_arrival_order():
    served, statuses = await burst(["/register"] * 50, per_turn=4)
    assert len(served) == 50 and statuses == [200] * 50
    assert most_in_one_iteration(served, "/register") <= 4
    assert [tick for _, tick in served] == sorted(tick for _, tick in served)


async def test_without_pacing_the_same_burst_runs_in_one_iteration():
    served, _ = await burst(["/register"] * 50, per_turn=50)
    assert most_in_one_iteration(served, "/register") == 50  # what the pacing is for


async def test_other_paths_are_not_held_behind_a_burst():
    served, _ = await burst(["/register"] * 40 + ["/ring"] * 5, per_turn=4)
    ring_ticks = [tick for p, tick in served if p == "/ring"]
    assert ring_ticks == [ring_ticks[0]] * 5 and ring_ticks[0] <= 1


async def test_a_request_cancelled_while_queued_lets_the_others_through():
    served = []

    async def app(scope, receive, send):
        served.append(scope["path"])

    paced = PaceBursts(app, paths=["/drain"], per_turn=1)
    tasks = [asyncio.create_task(paced({"type": "http", "path": "/drain"}, None, None)) for _ in range(4)]
    await asyncio.sleep(0)  # all four started: one ran, three queue
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[1], asyncio.CancelledError) and len(served) == 3
