"""A request's turn on its sequence, kept in the session store (the source of truth).

A turn opens at admission (the prompt's ids are appended and the sequence is held, before
`start`) and closes before `done` (the generated ids are appended). Requests on one sequence at
this worker wait for each other (a local lock); a request whose sequence is held by a turn on
another worker gets 409 `sequence_conflict`. Open turns are renewed while they run, so a crashed
worker's turn is released after `turn_lease_s`. Store calls run in threads, off the event loop.
"""

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import ContextTooLong, SequenceConflict, ServiceError, StoreUnavailable
from services.common.schemas import Resume
from services.worker import session_store as ss

logger = logging.getLogger(__name__)


@dataclass
class Turn:
    seq_id: str
    turn_id: str
    token_ids: list[int]   # the whole context: earlier turns, the prompt, resumed tokens
    prompt_tokens: int
    resumed: list[int] = field(default_factory=list)
    rollback_len: int = 0  # where cancel() cuts the history back to if the turn never starts

    @property
    def earlier_tokens(self) -> int:
        """Context from earlier turns: what another worker may hold KV for."""
        return len(self.token_ids) - len(self.resumed) - self.prompt_tokens


def store_error(exc: ss.SessionStoreError) -> ServiceError:
    if isinstance(exc, ss.TurnConflict):
        return SequenceConflict(str(exc), retry_after_s=1)
    return StoreUnavailable(f"session store unavailable: {exc}", retry_after_s=1)


class Turns:
    def __init__(self, store: ss.SessionStore, lease_s: float,
                 on_store_call: Callable[[str, float], None] = lambda op, seconds: None):
        self.store = store
        self.lease_s = lease_s
        self.on_store_call = on_store_call  # (op, seconds) of every store call; called in threads
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._open: dict[str, Turn] = {}  # turn_id -> turn

    async def begin(self, seq_id: str, turn_id: str, prompt_ids: list[int], *, max_tokens: int,
                    window: int, resume: Resume | None = None) -> Turn:
        """Waits for this worker's earlier request on the sequence, then opens the turn."""
        lock = self._locks[seq_id]
        await lock.acquire()
        try:
            turn = await asyncio.to_thread(self._begin, seq_id, turn_id, prompt_ids, max_tokens,
                                           window, resume)
        except BaseException:
            self._release(seq_id)
            raise
        self._open[turn_id] = turn
        return turn

    async def end(self, turn: Turn, generated: list[int]) -> None:
        """Appends this turn's newly generated ids and closes it (also for an aborted request)."""
        new = generated[len(turn.resumed):]
        try:
            await asyncio.to_thread(self._call, "end_turn", self.store.end_turn, turn.seq_id,
                                    turn.turn_id, len(turn.token_ids), new)
        finally:
            self._forget(turn)

    async def cancel(self, turn: Turn) -> None:
        """The request never started: take its prompt back out of the history."""
        try:
            await asyncio.to_thread(self._call, "end_turn", self.store.end_turn, turn.seq_id,
                                    turn.turn_id, len(turn.token_ids), [], keep_len=turn.rollback_len)
        except ServiceError as exc:
            logger.warning("could not roll back turn %s of %s: %s", turn.turn_id, turn.seq_id, exc)
        finally:
            self._forget(turn)

    async def delete(self, seq_id: str) -> bool:
        return await asyncio.to_thread(self._call, "delete", self.store.delete, seq_id)

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for turn in list(self._open.values()):
                try:
                    await asyncio.to_thread(self._timed, "renew", self.store.renew_turn, turn.seq_id,
                                            turn.turn_id)
                except ss.SessionStoreError as exc:
                    logger.warning("could not renew turn of %s: %s", turn.seq_id, exc)

    @property
    def num_open(self) -> int:
        return len(self._open)

    def is_open(self, turn: Turn) -> bool:
        return turn.turn_id in self._open

    # --- in a thread ----------------------------------------------------------------------
    def _begin(self, seq_id: str, turn_id: str, prompt_ids: list[int], max_tokens: int, window: int,
               resume: Resume | None) -> Turn:
        session = self._call("load", self.store.load, seq_id)
        earlier = session.token_ids if session else []
        if resume is not None:
            taken = self._take_over(seq_id, turn_id, session, resume, len(prompt_ids))
            if taken is not None:
                return taken
        context = len(earlier) + len(prompt_ids)
        if context + max_tokens > window:
            raise ContextTooLong(
                f"context of {context} tokens ({len(earlier)} earlier + {len(prompt_ids)} new) plus "
                f"max_tokens {max_tokens} exceeds the model window of {window}")
        token_ids = self._call("begin_turn", self.store.begin_turn, seq_id, turn_id, len(earlier),
                               prompt_ids)
        return Turn(seq_id, turn_id, token_ids, len(prompt_ids), rollback_len=len(earlier))

    def _take_over(self, seq_id: str, turn_id: str, session: ss.Session | None, resume: Resume,
                   prompt_tokens: int) -> Turn | None:
        """A migrated turn: continue the broken attempt's turn with the tokens the client already
        has. None when the broken attempt never opened its turn (start it afresh)."""
        done, ctx = resume.generated_ids, resume.context_tokens
        if session is not None and session.turn_id == resume.turn_id:  # still open: it died
            keep = ctx if ctx is not None else len(session.token_ids)
            token_ids = self._call("begin_turn", self.store.begin_turn, seq_id, turn_id,
                                   len(session.token_ids), done, take_over=resume.turn_id, keep_len=keep)
        elif ctx is None:
            return None
        elif session is not None and session.turn_id is None and \
                session.token_ids[ctx:ctx + len(done)] == done and len(session.token_ids) >= ctx + len(done):
            # The broken attempt closed its turn (it was aborted, not killed): keep what the client saw.
            token_ids = self._call("begin_turn", self.store.begin_turn, seq_id, turn_id,
                                   len(session.token_ids), [], keep_len=ctx + len(done))
        else:
            raise SequenceConflict("the interrupted turn was changed by another request meanwhile")
        # The client saw this turn's start: if it cannot go on, it keeps what it has (as an abort).
        return Turn(seq_id, turn_id, token_ids, prompt_tokens, resumed=list(done),
                    rollback_len=len(token_ids))

    def _call(self, op: str, fn, *args, **kwargs):
        try:
            return self._timed(op, fn, *args, **kwargs)
        except ss.SessionStoreError as exc:
            raise store_error(exc) from exc

    def _timed(self, op: str, fn, *args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.on_store_call(op, time.perf_counter() - started)

    def _forget(self, turn: Turn) -> None:
        if self._open.pop(turn.turn_id, None) is not None:
            self._release(turn.seq_id)

    def _release(self, seq_id: str) -> None:
        lock = self._locks[seq_id]
        lock.release()
        if not lock.locked() and not getattr(lock, "_waiters", None):
            with contextlib.suppress(KeyError):
                del self._locks[seq_id]

