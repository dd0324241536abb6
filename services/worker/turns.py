"""A request's turn on its sequence, kept in the session store (the source of truth).

A turn opens at admission (the prompt's ids are appended and the sequence is held, before
`start`) and closes before `done` (the generated ids are appended). Requests on one sequence at
this worker wait for each other (a local lock); a request whose sequence is held by a turn on
another worker gets 409 `sequence_conflict`. Open turns are renewed while they run, so a crashed
worker's turn is released after `turn_lease_s`. Store calls run in threads, off the event loop.

A turn's id is its request's (the client's Idempotency-Key, or the gateway's id for the request):
a repeat of a logged turn gets 409 `duplicate_turn` with that turn's outcome, except a turn whose
answer was never stored (its worker died; the gateway did not resume it), which runs again in its
place. A closing write the store cannot take now is retried until it can (turn_repairs).
"""

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import (ContextTooLong, DuplicateTurn, NotFound, SequenceConflict, ServiceError,
                                   StoreUnavailable)
from services.common.schemas import Resume
from services.worker import session_store as ss
from services.worker.turn_repairs import PendingEnd, Repairs

REPAIR_INTERVAL_S = 1.0
Decode = Callable[[list[int]], str]

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


def describe_turn(session: ss.Session, entry: ss.TurnEntry, decode: Decode | None = None) -> dict:
    """A turn's outcome, as a client may see it (its own turn, by its id)."""
    out = {"turn_id": entry.turn_id, "state": session.turn_state(entry), "prompt_tokens": entry.prompt_tokens,
           "completion_tokens": entry.completion_tokens or 0, "finish_reason": entry.finish or None}
    if decode is not None and entry.completion_tokens:
        answer = entry.start + entry.prompt_tokens
        out["text"] = decode(session.token_ids[answer:answer + entry.completion_tokens])
    return out


def store_error(exc: ss.SessionStoreError) -> ServiceError:
    if isinstance(exc, ss.TurnConflict):
        return SequenceConflict(str(exc), retry_after_s=1)
    return StoreUnavailable(f"session store unavailable: {exc}", retry_after_s=1)


class _BeginLost(Exception):
    """begin_turn's reply was lost (the store failed): `rollback` takes the turn back out if it
    landed after all; the client gets `error`."""

    def __init__(self, rollback: PendingEnd, error: ServiceError) -> None:
        super().__init__(error.message)
        self.rollback = rollback
        self.error = error


class Turns:
    def __init__(self, store: ss.SessionStore, lease_s: float,
                 on_store_call: Callable[[str, float], None] = lambda op, seconds: None):
        self.store = store
        self.lease_s = lease_s
        self.on_store_call = on_store_call  # (op, seconds) of every store call; called in threads
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._open: dict[str, Turn] = {}  # turn_id -> turn
        self.repairs = Repairs(store)

    async def begin(self, seq_id: str, turn_id: str, prompt_ids: list[int], *, max_tokens: int,
                    window: int, resume: Resume | None = None, decode: Decode | None = None) -> Turn:
        """Waits for this worker's earlier request on the sequence (and its pending closing
        write), then opens the turn. `decode` renders a duplicate's answer in its 409."""
        lock = self._locks[seq_id]
        await lock.acquire()
        try:
            await self._repair(self.repairs.for_sequence(seq_id))
            turn = await asyncio.to_thread(self._begin, seq_id, turn_id, prompt_ids, max_tokens,
                                           window, resume, decode)
        except _BeginLost as lost:  # kept here: only the event loop changes the pending writes
            self._release(seq_id)
            self.repairs.add(lost.rollback)
            raise lost.error from lost.__cause__
        except BaseException:
            self._release(seq_id)
            raise
        self._open[turn_id] = turn
        return turn

    async def end(self, turn: Turn, generated: list[int], finish: str, *, rollback_on_failure: bool) -> None:
        """Appends this turn's newly generated ids and closes it (also for an aborted request).
        If the store cannot take it now, a later write settles the turn: a rollback when the
        client is told of the failure (its `done` becomes an error), else (the client went away)
        this same write, which keeps what was generated, as an abort does."""
        new = generated[len(turn.resumed):]
        end = PendingEnd(turn.seq_id, turn.turn_id, len(turn.token_ids), tuple(new), finish=finish)
        await self._close_turn(turn, end, self._rollback_of(turn) if rollback_on_failure else end)

    async def cancel(self, turn: Turn) -> None:
        """The request never started: take its prompt back out of the history."""
        rollback = self._rollback_of(turn)
        try:
            await self._close_turn(turn, rollback, rollback)
        except ServiceError as exc:
            logger.warning("could not roll back turn %s of %s: %s", turn.turn_id, turn.seq_id, exc)

    async def describe(self, seq_id: str) -> dict:
        """The sequence's length and its last turns' outcomes (for a client that lost a reply)."""
        session = await asyncio.to_thread(self._call, "load", self.store.load, seq_id)
        if session is None:
            raise NotFound("unknown sequence")
        return {"history_tokens": len(session.token_ids), "open_turn": session.turn_id is not None,
                "turns": [describe_turn(session, entry) for entry in session.turns]}

    async def delete(self, seq_id: str) -> bool:
        return await asyncio.to_thread(self._call, "delete", self.store.delete, seq_id)

    async def repair_forever(self) -> None:
        while True:
            await asyncio.sleep(REPAIR_INTERVAL_S)
            await self._repair(self.repairs.pending())

    async def _repair(self, ends: list[PendingEnd]) -> None:
        if ends:
            self.repairs.forget(await asyncio.to_thread(self.repairs.retry, ends))

    async def _close_turn(self, turn: Turn, end: PendingEnd, on_failure: PendingEnd) -> None:
        """One closing write; if the store is unavailable, `on_failure` is kept for later."""
        try:
            await asyncio.to_thread(self._call, "end_turn", self.store.end_turn, end.seq_id, end.turn_id,
                                    end.expected_len, list(end.token_ids), keep_len=end.keep_len,
                                    finish=end.finish)
        except StoreUnavailable:
            self.repairs.add(on_failure)
            raise
        finally:
            self._forget(turn)

    @staticmethod
    def _rollback_of(turn: Turn) -> PendingEnd:
        return PendingEnd(turn.seq_id, turn.turn_id, len(turn.token_ids), (), keep_len=turn.rollback_len)

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
               resume: Resume | None, decode: Decode | None) -> Turn:
        session = self._call("load", self.store.load, seq_id)
        if resume is not None:
            taken = self._take_over(seq_id, turn_id, session, resume, len(prompt_ids))
            if taken is not None:
                return taken
        rerun = self._rerun_of(session, turn_id, decode)
        if rerun is not None:  # take the unanswered prompt back out, then run it afresh
            session = ss.Session(self._call("end_turn", self.store.end_turn, seq_id, turn_id,
                                            len(session.token_ids), [], keep_len=rerun.start), None)
        earlier = session.token_ids if session else []
        context = len(earlier) + len(prompt_ids)
        if context + max_tokens > window:
            raise ContextTooLong(
                f"context of {context} tokens ({len(earlier)} earlier + {len(prompt_ids)} new) plus "
                f"max_tokens {max_tokens} exceeds the model window of {window}")
        try:
            token_ids = self._timed("begin_turn", self.store.begin_turn, seq_id, turn_id, len(earlier), prompt_ids)
        except ss.DuplicateTurn as exc:  # the same request, at once on another worker
            now = self._call("load", self.store.load, seq_id) or session
            raise DuplicateTurn(str(exc), describe_turn(now, exc.entry, decode)) from None
        except ss.StoreUnavailable as exc:  # it may have landed: take it back when the store is back
            rollback = PendingEnd(seq_id, turn_id, context, (), keep_len=len(earlier))
            raise _BeginLost(rollback, store_error(exc)) from exc
        except ss.SessionStoreError as exc:
            raise store_error(exc) from exc
        return Turn(seq_id, turn_id, token_ids, len(prompt_ids), rollback_len=len(earlier))

    @staticmethod
    def _rerun_of(session: ss.Session | None, turn_id: str, decode: Decode | None) -> ss.TurnEntry | None:
        """This request's logged turn if it is to run again (its answer was never stored and it is
        still the sequence's open turn); DuplicateTurn for any other logged turn."""
        entry = session.entry(turn_id) if session else None
        if entry is None:
            return None
        if session.turn_state(entry) == "interrupted" and session.turn_id == turn_id:
            return entry
        raise DuplicateTurn(f"turn '{turn_id}' was already sent on this sequence",
                            describe_turn(session, entry, decode))

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
                                   len(session.token_ids), [], take_over=resume.turn_id,
                                   keep_len=ctx + len(done))
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

