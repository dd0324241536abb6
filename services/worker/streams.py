"""Bridges the engine thread to one HTTP request: a thread-safe sink feeding an asyncio queue."""

import asyncio
from typing import Any

from services.common.errors import ServiceError
from services.common.sse import TERMINAL_TYPES
from services.worker.engine.engine import Engine
from services.worker.engine.sequence import Request, SamplingParams
from services.worker.turns import Turn


class RequestHandle:
    def __init__(self, engine: Engine, turn: Turn, params: SamplingParams):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False
        self.request = Request(seq_id=turn.seq_id, token_ids=turn.token_ids, prompt_tokens=turn.prompt_tokens,
                               params=params, sink=self._sink, resumed=turn.resumed)

    @property
    def generated_ids(self) -> list[int]:
        """This turn's tokens so far (a migrated turn's resumed ones included)."""
        return list(self.request.generated) or list(self.request.resumed)

    def _sink(self, event: Any) -> None:  # engine thread
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more

    def submit(self) -> None:
        self._engine.submit(self.request)

    async def first_event(self) -> dict:
        """The `start` event; raises the ServiceError that refused the request instead."""
        event = await self._events.get()
        if isinstance(event, ServiceError):
            self.finished = True
            raise event
        return event

    async def events(self):
        while not self.finished:
            event = await self._events.get()
            self.finished = event["type"] in TERMINAL_TYPES
            yield event

    def abort(self) -> None:
        if not self.finished:
            self._engine.abort(self.request)
