"""n > 1 choices for one stateless prompt: n engine requests whose events merge into one stream.

Choice 0 prefills the prompt; the others wait for it and start from a copy of its KV (the
engine's `prompt_source`), so the prompt is computed once. With a seed, choice i samples with
seed + i (reproducible, and the choices still differ). Events: the first `start`, then every
choice's token events tagged with `choice`, then one `done` whose `choices` hold each choice's
result (an `error` of any choice ends the stream instead).
"""

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from services.common.errors import ServiceError
from services.common.sse import TERMINAL_TYPES
from services.worker.engine.engine import Engine
from services.worker.engine.sequence import Request, SamplingParams


class ChoiceGroup:
    def __init__(self, engine: Engine, name: str, prompt_ids: list[int], params: SamplingParams, n: int):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._pending: list[tuple[int, dict]] = []  # events that came while waiting for every start
        self.requests: list[Request] = []
        for i in range(n):
            choice = params if i == 0 else dataclasses.replace(
                params, seed=None if params.seed is None else params.seed + i, prompt_logprobs=None)
            self.requests.append(Request(seq_id=name, token_ids=prompt_ids, prompt_tokens=len(prompt_ids),
                                         params=choice, sink=self._sink(i), stateless=True,
                                         prompt_source=self.requests[0] if i else None))
        self._finished = [False] * n
        self._submitted = 0

    def _sink(self, choice: int):
        def sink(event: Any) -> None:  # engine thread
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, (choice, event))
            except RuntimeError:
                pass  # the loop is closed: nobody is listening any more
        return sink

    async def start(self) -> dict:
        """Submit every choice and wait for every `start` (so a refusal is an HTTP error before
        the first byte); returns the first. A group that does not start is aborted."""
        try:
            for request in self.requests:
                self._engine.submit(request)
                self._submitted += 1
            starts: dict[int, dict] = {}
            while len(starts) < len(self.requests):
                choice, event = await self._events.get()
                if isinstance(event, ServiceError):
                    self._finished[choice] = True
                    raise event
                if event["type"] == "start":
                    starts[choice] = event
                else:
                    self._pending.append((choice, event))
            return starts[0]
        except BaseException:
            self.abort()
            raise

    async def events(self) -> AsyncIterator[dict]:
        """Token events tagged with their choice, then the combined `done` (or an `error`)."""
        dones: dict[int, dict] = {}
        while len(dones) < len(self.requests):
            choice, event = self._pending.pop(0) if self._pending else await self._events.get()
            if event["type"] in TERMINAL_TYPES:
                self._finished[choice] = True
            if event["type"] == "done":
                dones[choice] = event
                continue
            yield {**event, "choice": choice}
            if event["type"] == "error":
                return
        yield combined_done([dones[i] for i in range(len(self.requests))])

    def abort(self) -> None:
        for request, finished in zip(self.requests[:self._submitted], self._finished):
            if not finished:
                self._engine.abort(request)


def combined_done(dones: list[dict]) -> dict:
    """One `done` for n choices: choice 0's fields, the completion tokens summed, and `choices`."""
    first = dones[0]
    usage = first["usage"] | {"completion_tokens": sum(d["usage"]["completion_tokens"] for d in dones)}
    choices = [{"index": i, "text": d["text"], "finish_reason": d["finish_reason"], "usage": d["usage"]}
               for i, d in enumerate(dones)]
    return {**first, "usage": usage, "choices": choices}
