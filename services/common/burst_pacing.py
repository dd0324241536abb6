"""Spreads a burst of requests over event-loop iterations (the coordinator's membership writes).

asyncio runs every callback that is ready in one iteration before it looks at its timers and
sockets again. When a thousand workers register at once, or a rolling update drains a hundred,
the requests that arrived together all run in one iteration: at 0.4-0.9 ms of the coordinator's
CPU each, 60-70 ms in which a gateway's long poll or a /route waits (README, "Control plane at
scale"). Here at most `per_turn` of the listed routes start in one iteration; the rest queue
(first come, first served) and `per_turn` of them are let go each following iteration, so the loop
comes round every few milliseconds. The total work is unchanged. (A semaphore would not do: a
handler that completes in one step holds no slot long enough for anyone to wait on it.)
"""

import asyncio
from collections import deque
from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

PER_TURN = 8


class PaceBursts:
    def __init__(self, app: ASGIApp, paths: Collection[str], per_turn: int = PER_TURN) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.per_turn = per_turn
        self._in_turn = 0  # started (or let go) in this iteration
        self._waiting: deque[asyncio.Future] = deque()
        self._turn_scheduled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            await self._take_turn()
        await self.app(scope, receive, send)

    async def _take_turn(self) -> None:
        loop = asyncio.get_running_loop()
        if self._in_turn < self.per_turn and not self._waiting:
            self._in_turn += 1
            self._schedule_turn(loop)
            return
        turn = loop.create_future()
        self._waiting.append(turn)
        self._schedule_turn(loop)
        await turn

    def _schedule_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._turn_scheduled:  # call_soon runs it in the next iteration
            self._turn_scheduled = True
            loop.call_soon(self._next_turn, loop)

    def _next_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._turn_scheduled, self._in_turn = False, 0
        while self._waiting and self._in_turn < self.per_turn:
            turn = self._waiting.popleft()
            if not turn.done():  # done: its request was cancelled (the client left)
                turn.set_result(None)
                self._in_turn += 1
        if self._waiting or self._in_turn:
            self._schedule_turn(loop)
