"""A generation request as the engine sees it (no torch, no asyncio)."""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from services.worker.kv.store import SequenceEntry

# Receives event dicts, or a ServiceError before the `start` event. Must be thread-safe.
EventSink = Callable[[Any], None]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 50
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end generation; they are not part of the text


@dataclass(frozen=True)
class RequestTimings:
    """A finished request's phases, in seconds (vLLM's definitions, from the engine's clock)."""
    queue_s: float    # arrival (submitted to the engine) to admission (its first scheduled step)
    prefill_s: float  # admission to the first token
    decode_s: float   # first token to last token
    ttft_s: float     # arrival to the first token
    e2e_s: float      # arrival to the last token


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()     # prefilling or decoding
    COMPLETING = auto()  # done was sent; writing the last token's KV so a continuation finds it
    FINISHED = auto()


@dataclass(eq=False)
class Request:
    seq_id: str
    # The sequence's whole context as the session store holds it: earlier turns, this prompt, and
    # (a migrated turn) the tokens already generated. The engine's KV is reconciled to it.
    token_ids: list[int]
    prompt_tokens: int
    params: SamplingParams
    sink: EventSink
    resumed: list[int] = field(default_factory=list)  # this turn's tokens generated elsewhere
    # No session: `token_ids` is the whole prompt, `seq_id` only names the request in its events,
    # and the engine picks the entry (the longest cached prefix) at admission.
    stateless: bool = False
    public_id: str | None = None  # the seq_id the events name, when not seq_id (gateway.tenants)
    arrival_s: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    entry: SequenceEntry | None = None
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    handoff_tokens: int = 0
    tier_tokens: int = 0  # positions loaded from the lower KV tiers at admission
    prefetched: Any = None  # lower-tier chunks read for it while it waited (kv.lower.Prefetched)
    loading: bool = False  # those chunks are being read: not admitted until they are
    context_tokens: int = 0
    aborted: bool = False
    in_inbox: bool = False
    sampler: Any = None          # per-request random generator, set at admission
    detok: Any = None            # incremental detokenizer state
    stop: Any = None             # StopMatcher when params.stop is set
    text: str = ""               # the text released to the client so far
    admitted_s: float = 0.0
    first_token_s: float = 0.0
    last_token_s: float = 0.0

    def timings(self) -> RequestTimings:
        return RequestTimings(queue_s=self.admitted_s - self.arrival_s,
                              prefill_s=self.first_token_s - self.admitted_s,
                              decode_s=self.last_token_s - self.first_token_s,
                              ttft_s=self.first_token_s - self.arrival_s,
                              e2e_s=self.last_token_s - self.arrival_s)

    @property
    def num_pending(self) -> int:
        """Tokens of the context whose KV is not written yet (1 while decoding)."""
        kv = self.entry.kv if self.entry else None
        return len(self.entry.token_ids) - kv.num_tokens if kv else 0

    @property
    def wants_sample(self) -> bool:
        return self.status is Status.RUNNING
