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
    top_k: int = 0         # 0: every token
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end generation; not part of the text unless included
    stop_token_ids: tuple[int, ...] = ()  # tokens that end generation (as the EOS does)
    include_stop_str_in_output: bool = False  # the stop string or stop token's text is kept
    min_tokens: int = 0    # no EOS, stop token or stop string ends generation before this many
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logprobs: int | None = None         # alternatives per generated token (0: the token's own only)
    prompt_logprobs: int | None = None  # the same for each prompt token (stateless requests only)


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
    # n > 1: a sibling waits for this request's prompt KV and starts from a copy of it.
    prompt_source: "Request | None" = None
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
    prompt_logprobs: list | None = None  # prompt_logprobs: one entry per prompt token
    dropped_stop_token: bool = False  # ended by a stop token whose text is not part of the output
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
