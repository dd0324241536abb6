"""Closing writes of turns that the session store could not take, kept and retried until it can.

Without them a turn whose closing write failed (the store was down) stayed open, its prompt in the
history and no answer, until its lease ran out: measured, 409s for the rest of the 30 s lease
after a Redis restart, and 8 of 20 histories left with an unanswered prompt. A pending write is
retried every few seconds until the store takes it, or answers that the turn is no longer this
worker's to close (a TurnConflict: another worker took it over, or the write had in fact landed
before its reply was lost): either way nothing is left to do. Synchronous; no framework imports.
"""

import logging
from dataclasses import dataclass

from services.worker import session_store as ss

logger = logging.getLogger(__name__)
MAX_PENDING = 10_000  # past this, the oldest is left to its lease


@dataclass(frozen=True)
class PendingEnd:
    """The arguments of one end_turn call."""

    seq_id: str
    turn_id: str
    expected_len: int
    token_ids: tuple[int, ...]
    keep_len: int | None = None
    finish: str = ""

    def describe(self) -> str:
        action = "roll back" if self.keep_len is not None and not self.token_ids else "close"
        return f"{action} turn {self.turn_id} of {self.seq_id}"


class Repairs:
    def __init__(self, store: ss.SessionStore) -> None:
        self.store = store
        self._pending: dict[str, PendingEnd] = {}  # turn_id -> its write

    def add(self, end: PendingEnd) -> None:
        if len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending))
            logger.warning("too many pending turn writes: left to its lease: %s",
                           self._pending.pop(oldest).describe())
        self._pending[end.turn_id] = end
        logger.warning("session store unavailable: will %s when it is back", end.describe())

    def __len__(self) -> int:
        return len(self._pending)

    def for_sequence(self, seq_id: str) -> list[PendingEnd]:
        return [end for end in self._pending.values() if end.seq_id == seq_id]

    def pending(self) -> list[PendingEnd]:
        return list(self._pending.values())

    def retry(self, ends: list[PendingEnd]) -> list[PendingEnd]:
        """In a thread (the store is synchronous): tries each write once; returns those settled,
        for `forget` (on the event loop, which alone changes the pending set)."""
        return [end for end in ends if self._settled(end)]

    def forget(self, settled: list[PendingEnd]) -> None:
        for end in settled:
            if self._pending.get(end.turn_id) is end:
                del self._pending[end.turn_id]

    def _settled(self, end: PendingEnd) -> bool:
        try:
            self.store.end_turn(end.seq_id, end.turn_id, end.expected_len, list(end.token_ids),
                                keep_len=end.keep_len, finish=end.finish)
        except ss.TurnConflict:
            logger.info("no need to %s: the turn is no longer this worker's", end.describe())
            return True
        except ss.SessionStoreError:
            return False
        logger.info("session store is back: did %s", end.describe())
        return True
