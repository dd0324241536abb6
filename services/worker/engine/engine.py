"""The engine loop: one thread that schedules, runs one packed forward, and emits tokens.

The event loop never runs a forward pass: requests arrive through an inbox queue, and events go
back through each request's thread-safe sink.
"""

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from services.common.errors import ContextTooLong, InvalidRequest, Overloaded, ServiceError, Unavailable
from services.worker.engine.detokenizer import DecodeOptions, DetokState, decode, next_text
from services.worker.engine.sampling import logprobs_of, make_generator, process_logits, sample_token
from services.worker.engine.scheduler import Admission, ScheduledItem, Scheduler
from services.worker.engine.sequence import Request, RequestTimings, Status
from services.worker.engine.stop import StopMatcher
from services.worker.kv.lower import LowerTiers
from services.worker.kv.store import KVCapacityError, KVStore, SequenceEntry
from services.worker.model.loader import LoadedModel
from services.worker.model.runner import ModelRunner, StepInput

logger = logging.getLogger(__name__)

T = TypeVar("T")

IDLE_WAIT_S = 0.5  # the engine thread checks for stop this often when idle
TAIL_STEP_WAIT_S = 5.0  # the longest a DELETE or an export waits for a finished request's last-token step
RESET_FLUSH_S = 5.0  # the longest a prefix-cache reset waits for the tiers to forget its chunks


@dataclass(frozen=True)
class EngineConfig:
    worker_id: str
    max_batch_size: int = 32
    max_batch_tokens: int = 512
    max_waiting_requests: int = 256
    enable_kv_reuse: bool = True
    # A finished session request's last token waits this long for the sequence's next request
    # before a step of its own writes its KV: arriving in time, the next request's first step
    # writes it instead of waiting for that step (an agent's next turn comes within ms).
    tail_wait_s: float = 0.05


class EngineObserver:
    """Told each request's timings on the engine thread, before the client sees the event (so
    an implementation must be thread-safe; prometheus_client's metrics are). Does nothing here."""

    def on_token_gap(self, gap_s: float) -> None:
        """Between two consecutive tokens of one request."""

    def on_finished(self, timings: RequestTimings) -> None:
        """A request about to send `done`."""


def _within_model_limits(config: EngineConfig, loaded: LoadedModel) -> EngineConfig:
    limit = loaded.spec.max_step_tokens
    if limit is None or config.max_batch_tokens <= limit:
        return config
    logger.warning("max_batch_tokens %d lowered to %d: a larger step of %s would be computed wrong",
                   config.max_batch_tokens, limit, loaded.name)
    return dataclasses.replace(config, max_batch_tokens=limit)


class Engine:
    def __init__(self, loaded: LoadedModel, store: KVStore, config: EngineConfig,
                 observer: EngineObserver | None = None, tiers: LowerTiers | None = None):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.store = store
        # LongRoPE KV depends on the whole sequence's length, which a stored chunk does not name
        self.tiers = tiers if config.enable_kv_reuse and loaded.rope_regime is None else None
        if tiers is not None and self.tiers is None:
            logger.info("KV tiers off: %s's KV depends on the sequence length (LongRoPE)", loaded.name)
        self.fingerprint: dict = {}  # set by whoever built the engine (KV handoff, tiers)
        if self.tiers is not None:
            store.spill = self.tiers.spill
        self.config = config
        self.observer = observer or EngineObserver()
        self.runner = ModelRunner(loaded)
        self.max_token_chars = max((len(token) for token in self.tokenizer.get_vocab()), default=1)
        self.vocab_size = loaded.model.get_output_embeddings().weight.shape[0]
        self._token_texts: dict[int, str] = {}  # a token's text decoded alone (logprobs), engine thread only
        config = _within_model_limits(config, loaded)
        self.scheduler = Scheduler(self._admit, config.max_batch_size, config.max_batch_tokens)
        self.lock = threading.Lock()  # guards scheduler + store against readers (stats, delete)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._num_queued = 0  # submitted, not yet taken from the inbox
        self._queued_lock = threading.Lock()
        self._stepping: set[Request] = set()  # the requests of the step running now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self.counters = dict.fromkeys(
            ("requests", "hits", "misses", "new_sequences", "stateless_requests", "prompt_tokens",
             "prefill_tokens", "reused_tokens", "handoff_tokens", "tier_tokens", "generated_tokens", "steps", "aborted",
             "rejected", "prefix_cache_queries", "prefix_cache_hits"), 0)

    # --- called from other threads -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def submit(self, request: Request) -> None:
        with self._queued_lock:
            waiting = self._num_queued + len(self.scheduler.waiting)
            if waiting >= self.config.max_waiting_requests:
                raise Overloaded(f"{waiting} requests already waiting on this worker", retry_after_s=1)
            self._num_queued += 1
        request.in_inbox = True
        self._inbox.put(request)

    def abort(self, request: Request) -> None:
        request.aborted = True
        self._inbox.put(request)  # wakes the loop; it drops aborted requests

    def delete_sequence(self, seq_id: str) -> bool | None:
        """True if deleted, False if unknown, None if a request is running on it. Blocking: a
        finished request's last-token step that is running now is waited for (a DELETE sent
        right after `done` must not get 409 for it)."""
        def attempt() -> bool | None:
            entry = self.store.get(seq_id)
            if entry is None:
                return False
            self._end_held_tail(seq_id)
            ids = list(entry.token_ids)
            if not self.store.delete(seq_id):
                return None
            if self.tiers is not None:
                self.tiers.forget(ids)
            return True

        return self._after_tail_step(seq_id, attempt)

    def reset_prefix_cache(self) -> dict:
        """Blocking. Drops the stateless (prefix cache) entries and their chunks in the lower
        tiers (as a DELETE does a sequence's: a prefix chunk a conversation shares goes too, a
        cache loss only); conversations keep their device KV. Waits for the tiers' writer, so
        that the next request finds none of it."""
        forget = self.tiers.forget if self.tiers is not None else None
        with self.lock:
            result = self.store.drop_stateless(forget)
        if self.tiers is not None and not self.tiers.flush(RESET_FLUSH_S):
            logger.warning("prefix cache reset: the KV tiers' writer did not finish in %.0f s", RESET_FLUSH_S)
        return result

    def prefetch(self, req: Request) -> None:
        """Blocking (tier reads), for a request submitted with `loading` set: read the lower-tier
        chunks that extend what device memory holds of its context while it waits in the queue
        (it is not admitted before); admission copies them into its KV."""
        try:
            if not self._loads_from_tiers(req):
                return
            limit = len(req.token_ids) - 1  # the last position is computed: its logits are needed
            if req.stateless:
                with self.lock:
                    match = self.store.longest_prefix(req.token_ids)
                have = match[1] if match else 0
            else:
                have = self.cached_prefix(req.seq_id, req.token_ids)
            earlier = len(req.token_ids) - req.prompt_tokens - len(req.resumed)
            if req.stateless or have < earlier:  # a session whose history is here: nothing to find
                req.prefetched = self.tiers.prefetch(req.token_ids, have, limit)
        finally:
            req.loading = False
            self._inbox.put(None)  # wakes the loop: the request may be admitted now

    def _loads_from_tiers(self, req: Request) -> bool:
        """Prompt logprobs need every prompt position computed: no KV from anywhere."""
        return self.tiers is not None and req.params.prompt_logprobs is None

    def encode(self, text: str) -> list[int]:
        self.check_text_fits(len(text))
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def check_text_fits(self, num_chars: int) -> None:
        """ContextTooLong, without tokenizing, for text that must encode to more tokens than the
        window holds: no token covers more than `max_token_chars` characters (a 4 MB prompt took
        ~15 s of CPU to tokenize before its 400)."""
        if num_chars > self.window * self.max_token_chars:
            raise ContextTooLong(f"a prompt of {num_chars} characters encodes to more than the model window of "
                                 f"{self.window} tokens")

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        if any(t >= self.vocab_size for t in token_ids):
            raise InvalidRequest(f"{param} holds an id outside the vocabulary (0..{self.vocab_size - 1})", param=param)

    @property
    def window(self) -> int:
        return self.store.layout.max_positions

    def cached_prefix(self, seq_id: str, token_ids: list[int]) -> int:
        with self.lock:
            entry = self.store.get(seq_id)
            return entry.cached_prefix(token_ids) if entry else 0

    def write_behind_all(self) -> None:
        """Queue every idle sequence's KV the shared tier lacks (a drain: what nobody pulled)."""
        if self.tiers is None:
            return
        with self.lock:
            for entry in self.store.entries.values():
                if entry.kv is not None and not entry.busy and not entry.stateless:
                    self.tiers.write_behind(entry)

    def num_cached_sequences(self) -> int:
        """Sessions whose KV is held here: what a draining worker waits to hand off (stateless
        entries are pure cache, never handed off)."""
        with self.lock:
            return sum(1 for e in self.store.entries.values() if e.kv is not None and not e.stateless)

    # --- KV handoff: export to and import from other workers ---------------------------------
    def pin_for_export(self, seq_id: str) -> tuple[list[int], torch.Tensor] | None:
        """The cached token ids and the KV buffer `[layers, 2, kv_heads, capacity, head_dim]`
        (positions 0..len(ids) valid), pinned until unpin(); None if nothing can be exported.
        Blocking, as delete_sequence: a finished request's last-token step running now is waited
        for (`done` reaches the client from inside that step; an export asked for at once, a
        drain's handoff right after a turn, found the entry busy and lost the KV)."""
        def attempt() -> tuple[list[int], torch.Tensor] | None:
            self._end_held_tail(seq_id)
            entry = self.store.get(seq_id)
            if entry is None or entry.stateless or entry.busy or not entry.num_cached:
                return None
            self.store.acquire(entry)
            return entry.token_ids[:entry.num_cached], entry.kv.data

        return self._after_tail_step(seq_id, attempt)

    def _after_tail_step(self, seq_id: str, attempt: Callable[[], T | None]) -> T | None:
        """`attempt()` under the lock; while it gives None and the sequence's finished request is
        in its last-token step now, again once that step is over (at most TAIL_STEP_WAIT_S)."""
        deadline = time.monotonic() + TAIL_STEP_WAIT_S
        while True:
            with self.lock:
                result = attempt()
                if result is not None or not self._tail_stepping(seq_id) or time.monotonic() > deadline:
                    return result
            time.sleep(0.002)

    def unpin(self, seq_id: str) -> None:
        with self.lock:
            entry = self.store.get(seq_id)
            if entry is not None:
                self.store.release(entry)

    def drop_sequence_kv(self, seq_id: str) -> bool:
        """Forget an idle sequence's KV and ids here (another worker took it over)."""
        with self.lock:
            return self.store.delete(seq_id)

    def import_kv(self, seq_id: str, token_ids: list[int], kv: torch.Tensor, reserve_tokens: int) -> int:
        """Adopt KV `[layers, 2, kv_heads, n, head_dim]` for `token_ids` (n of them) unless this
        worker already holds as much; reserves `reserve_tokens` positions. Returns n, or 0."""
        n = len(token_ids)
        with self.lock:
            entry = self.store.get_or_create(seq_id)
            if entry.busy or entry.cached_prefix(token_ids) >= n:
                return 0
            self.store.drop_kv(entry)
            entry.token_ids = list(token_ids)
            try:
                self.store.reserve(entry, max(n, reserve_tokens))
            except KVCapacityError:
                return 0
            self.store.acquire(entry)  # not evicted while the copy runs outside the lock
        copied = False
        try:
            entry.kv.data[:, :, :, :n].copy_(kv)
            copied = True
        finally:
            with self.lock:
                if copied:
                    entry.kv.num_tokens = entry.imported_tokens = n
                self.store.release(entry)
        return n

    def stats(self) -> dict:
        with self.lock:
            stats = {**self.store.stats(), **self.counters,
                     "running": len(self.scheduler.running),
                     "waiting": len(self.scheduler.waiting) + self._num_queued}
        if self.tiers is not None:
            stats["kv_tiers"] = self.tiers.stats()
        return stats

    # --- engine thread ---------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        wait_s = IDLE_WAIT_S
        while not self._stop.is_set():
            try:
                self._take_inbox(wait_s)
                with self.lock:
                    self._fold_tails()
                    batch, wait_s = self._hold_tails(self.scheduler.schedule())
                    self._stepping = {item.request for item in batch}
                if batch:
                    self._run_step(batch)
            except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                logger.exception("engine step failed")
                self._fail_all(exc)
                wait_s = 0.0

    def _fail_all(self, exc: Exception) -> None:
        with self.lock:
            for req in [*self.scheduler.running, *self.scheduler.waiting]:
                self._fail(req, exc)

    def _take_inbox(self, wait_s: float) -> None:
        try:
            item = self._inbox.get(timeout=wait_s) if wait_s > 0 else self._inbox.get_nowait()
            while True:
                self._accept(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _hold_tails(self, batch: list[ScheduledItem]) -> tuple[list[ScheduledItem], float]:
        """The step to run now and how long to wait for the inbox before the next. A step of
        nothing but finished requests' last tokens waits for `tail_wait_s` after the oldest
        one's `done` (a continuation may come and write its tail in its own first step)."""
        if any(item.request.status is not Status.COMPLETING for item in batch):
            return batch, 0.0
        if not batch:
            return batch, 0.0 if self.scheduler.has_work() else IDLE_WAIT_S
        wait_s = min(item.request.last_token_s for item in batch) + self.config.tail_wait_s - time.perf_counter()
        return ([], wait_s) if wait_s > 0 else (batch, 0.0)

    def _fold_tails(self) -> None:
        """A finished request whose last token's KV is not written yet ends now if the next
        request on its sequence is waiting: that request's first step writes it (never with
        tail_wait_s 0: then the token always gets a step of its own)."""
        tails = {r.seq_id: r for r in self.scheduler.running if r.status is Status.COMPLETING}
        if not tails or self.config.tail_wait_s <= 0:
            return
        for req in self.scheduler.waiting:
            done = None if req.stateless else tails.pop(req.seq_id, None)
            if done is not None:
                self._finish(done)  # its KV ends before its last token, which req computes

    def _tail_stepping(self, seq_id: str) -> bool:
        """(Under the lock.) Whether the step running now writes a finished request's last token
        on the sequence."""
        return any(r.seq_id == seq_id and r.status is Status.COMPLETING for r in self._stepping)

    def _end_held_tail(self, seq_id: str) -> None:
        """(Under the lock.) A finished request on the sequence whose last token waits for a step
        ends now, unless that step is running: its sequence keeps the KV before that token."""
        for req in self.scheduler.running:
            if req.seq_id == seq_id and req.status is Status.COMPLETING and req not in self._stepping:
                self._finish(req)
                return

    def _accept(self, request: Request | None) -> None:
        if request is None:
            return
        with self.lock:
            if request.in_inbox:  # first arrival (an abort puts the same request in again)
                request.in_inbox = False
                with self._queued_lock:
                    self._num_queued -= 1
                if not request.aborted:
                    self.scheduler.add(request)
                    return
            if request.aborted:
                self._drop(request)

    def _run_step(self, batch: list[ScheduledItem]) -> None:
        inputs = [StepInput(item.request.entry.kv, self._feed_ids(item), item.samples,
                            len(item.request.entry.token_ids), self._wants_prompt_logits(item.request))
                  for item in batch]
        try:
            logits = self.runner.forward(inputs)
        except Exception as exc:  # noqa: BLE001 - a failed step must not kill the engine
            logger.exception("forward pass failed")
            self._fail_batch(batch, exc)
            return
        with self.lock:
            self.counters["steps"] += 1
            row = 0
            for item, step_input in zip(batch, inputs):
                rows = logits[row:row + step_input.num_logit_rows]  # [num_logit_rows, vocab]
                row += step_input.num_logit_rows
                start = item.request.entry.kv.num_tokens
                item.request.entry.kv.num_tokens += item.num_tokens
                if step_input.all_logits:
                    self._on_prompt_logits(item.request, start, rows)
                if step_input.sample:
                    self._on_token(item.request, rows[-1])
                elif item.request.status is Status.COMPLETING:
                    self._finish(item.request)

    @staticmethod
    def _wants_prompt_logits(req: Request) -> bool:
        return req.params.prompt_logprobs is not None and req.status is Status.RUNNING and not req.generated

    def _on_prompt_logits(self, req: Request, start: int, rows: torch.Tensor) -> None:
        """Prompt logprobs from a prefill chunk's logits at positions start..: row j predicts the
        prompt token at start + j + 1."""
        targets = req.token_ids[start + 1:start + 1 + rows.shape[0]]
        if targets:
            req.prompt_logprobs.extend(self._logprob_entries(rows[:len(targets)], targets,
                                                             req.params.prompt_logprobs))

    @staticmethod
    def _feed_ids(item: ScheduledItem) -> list[int]:
        start = item.request.entry.kv.num_tokens
        return item.request.entry.token_ids[start:start + item.num_tokens]

    # --- admission -------------------------------------------------------------------------
    def _admit(self, req: Request) -> Admission:
        if req.aborted:
            self._drop(req)
            return Admission.REJECTED
        if self._source_prefilling(req):
            return Admission.DEFER
        context = len(req.token_ids) - len(req.resumed)
        error = self._size_error(context, req.params.max_tokens)
        if error is not None:  # refused before anything is evicted for it
            return self._reject(req, error)
        entry = self._claim(req)
        if entry is None:  # its KV is being exported or imported: wait a step
            return Admission.NO_ROOM
        if not self._kv_reusable(entry, len(req.token_ids)):
            self.store.drop_kv(entry)
        entry.reconcile(req.token_ids)
        if not self.config.enable_kv_reuse:
            self.store.drop_kv(entry)
        try:  # reserve the whole generation up front: a running request never runs out of KV
            self.store.reserve(entry, context + req.params.max_tokens)
        except KVCapacityError:  # it fits the budget (checked): room comes as running requests end
            self.store.release(entry)
            return Admission.NO_ROOM
        req.entry = entry
        if self._loads_from_tiers(req) and self._kv_reusable(entry, len(req.token_ids)):
            req.tier_tokens = self.tiers.load_into(entry, req.prefetched)
        req.prefetched = None
        req.cached_tokens = entry.num_cached
        req.handoff_tokens = min(entry.imported_tokens, req.cached_tokens)
        entry.imported_tokens = 0
        self._start(req, context)
        return Admission.ADMITTED

    def _size_error(self, context: int, max_tokens: int) -> ServiceError | None:
        window = self.store.layout.max_positions
        if context + max_tokens > window:
            return ContextTooLong(f"context of {context} tokens plus max_tokens {max_tokens} exceeds the "
                                  f"model window of {window}")
        if not self.store.fits(context + max_tokens):
            return Unavailable(f"request too large for this worker's KV budget: {context + max_tokens} "
                               f"positions need more than its {self.store.budget_bytes} bytes")
        return None

    def _claim(self, req: Request) -> SequenceEntry | None:
        """The entry the request runs on, acquired (busy, out of the prefix index); None while
        a session's entry is busy with a KV transfer."""
        if req.stateless:
            entry = self._stateless_entry(req)
        else:
            entry = self.store.get_or_create(req.seq_id)
            if entry.busy:
                return None
        self.store.acquire(entry)
        return entry

    def _source_prefilling(self, req: Request) -> bool:
        """An n > 1 sibling waits while the request whose prompt KV it copies is still prefilling
        (the copy then saves the whole prompt's compute; the KV is read between steps, on this
        thread)."""
        source = req.prompt_source
        return (source is not None and source.status in (Status.WAITING, Status.RUNNING)
                and not source.generated and not source.aborted and self.config.enable_kv_reuse)

    def _sibling_entry(self, req: Request) -> SequenceEntry | None:
        """A new entry holding a copy of the n > 1 source's prompt KV (all but the last prompt
        token, whose logits the sibling computes itself), or None if it has none to give."""
        source = req.prompt_source
        if source is None or source.entry is None or source.entry.kv is None:
            return None
        length = min(source.entry.cached_prefix(req.token_ids), len(req.token_ids) - 1)
        if length <= 0 or not self._kv_reusable(source.entry, len(req.token_ids)):
            return None
        entry = self.store.new_stateless(protect=source.entry)
        if not self.store.copy_prefix(source.entry, entry, length, len(req.token_ids) + req.params.max_tokens):
            self.store.delete(entry.seq_id)
            return None
        return entry

    def _stateless_entry(self, req: Request) -> SequenceEntry:
        """The next turn of a cached conversation adopts the stateless entry whose whole KV
        starts its prompt (no copy); any other request gets a new entry, into which the longest
        cached prefix (of any idle entry, sessions included, read only) is copied. Prompt
        logprobs need every prompt position computed: no reuse."""
        sibling = self._sibling_entry(req) if self.config.enable_kv_reuse else None
        if sibling is not None:
            return sibling
        reuse = self.config.enable_kv_reuse and req.params.prompt_logprobs is None
        match = self.store.longest_prefix(req.token_ids) if reuse else None
        if match is None:
            return self.store.new_stateless()
        source, length = match
        if not self._kv_reusable(source, len(req.token_ids)):
            return self.store.new_stateless()
        if source.stateless and length == source.num_cached:
            self.store.touch(source)
            return source
        entry = self.store.new_stateless(protect=source)
        self.store.copy_prefix(source, entry, length, len(req.token_ids) + req.params.max_tokens)
        return entry

    def _kv_reusable(self, entry: SequenceEntry, sequence_tokens: int) -> bool:
        """Whether an entry's KV was computed as a sequence of `sequence_tokens` needs it
        (LongRoPE: with the same factors)."""
        regime = self.loaded.rope_regime
        return regime is None or entry.kv is None \
            or not regime.must_recompute(entry.kv.num_tokens, sequence_tokens)

    def _keep_reusable_kv(self, entry: SequenceEntry) -> None:
        """Forget KV the sequence outgrew (LongRoPE: the whole sequence is then recomputed with the
        long factors, as transformers' generate does at that step)."""
        if not self._kv_reusable(entry, len(entry.token_ids)):
            entry.kv.num_tokens = 0

    def _start(self, req: Request, context: int) -> None:
        self._count_start(req, context)
        req.context_tokens = context
        req.sampler = make_generator(req.params.seed, self.store.layout.device)
        req.detok = DetokState()
        req.stop = StopMatcher(req.params.stop, include=req.params.include_stop_str_in_output) \
            if req.params.stop else None
        req.prompt_logprobs = None if req.params.prompt_logprobs is None else [  # the first token has none
            {"token_id": req.token_ids[0], "token": self._token_text(req.token_ids[0]), "logprob": None,
             "top_logprobs": None}]
        for i in range(len(req.resumed)):  # a migrated turn: its text so far was already sent
            req.generated.append(req.resumed[i])
            next_text(self.tokenizer, req.generated, req.detok, options=self._decode_options(req))
        req.admitted_s = time.perf_counter()
        req.sink({"type": "start", "seq_id": req.public_id or req.seq_id, "worker_id": self.config.worker_id,
                  "context_tokens": req.context_tokens, "cached_tokens": req.cached_tokens,
                  "handoff_tokens": req.handoff_tokens, "tier_tokens": req.tier_tokens})

    def _count_start(self, req: Request, context: int) -> None:
        known = context > req.prompt_tokens
        self.counters["requests"] += 1
        if req.stateless:
            self.counters["stateless_requests"] += 1
        else:
            self.counters["new_sequences" if not known else ("hits" if req.cached_tokens else "misses")] += 1
        self.counters["reused_tokens"] += req.cached_tokens
        self.counters["handoff_tokens"] += req.handoff_tokens
        self.counters["tier_tokens"] += req.tier_tokens
        self.counters["prompt_tokens"] += len(req.token_ids)  # vLLM's: the whole context it was given
        self.counters["prefill_tokens"] += len(req.token_ids) - req.cached_tokens
        if self.config.enable_kv_reuse:  # vLLM's semantics: positions looked up, and found
            self.counters["prefix_cache_queries"] += len(req.token_ids)
            self.counters["prefix_cache_hits"] += req.cached_tokens

    def _reject(self, req: Request, error: ServiceError) -> Admission:
        """Refused before any entry was claimed (or after it was released)."""
        self.counters["rejected"] += 1
        req.status = Status.FINISHED
        req.sink(error)
        return Admission.REJECTED

    # --- tokens and endings ----------------------------------------------------------------
    def _on_token(self, req: Request, logits: torch.Tensor) -> None:
        # logits: [vocab], the model's raw output (logprobs are reported from it, as vLLM does)
        p = req.params
        processed = process_logits(self.runner.suppress(logits), p, req.entry.token_ids, req.generated,
                                   self._stop_token_ids(req))
        token = sample_token(processed, p.temperature, p.top_p, req.sampler, p.top_k, p.min_p)
        now = time.perf_counter()
        if req.last_token_s:
            self.observer.on_token_gap(now - req.last_token_s)
        req.first_token_s = req.first_token_s or now
        req.last_token_s = now
        req.generated.append(token)
        req.entry.token_ids.append(token)
        self._keep_reusable_kv(req.entry)
        self.counters["generated_tokens"] += 1
        stop_token = token in self._stop_token_ids(req)
        req.dropped_stop_token = stop_token and not p.include_stop_str_in_output
        finish = "stop" if stop_token else "length" if len(req.generated) >= p.max_tokens else None
        text, stopped = self._release_text(req, final=finish is not None)
        event = {"type": "token", "index": len(req.generated) - 1, "token_id": token, "token": text}
        if p.logprobs is not None:
            event["logprobs"] = self._logprob_entries(logits.unsqueeze(0), [token], p.logprobs)[0]
        if req.prompt_logprobs is not None and len(req.generated) == 1:
            event["prompt_logprobs"] = req.prompt_logprobs
        req.sink(event)
        if finish or stopped:
            self._done(req, "stop" if stopped else finish)

    def _stop_token_ids(self, req: Request) -> tuple[int, ...]:
        """The tokens that end this request's generation: the EOS (unless ignore_eos) and its stop_token_ids."""
        eos = self.loaded.eos_token_id
        if req.params.ignore_eos or eos is None:
            return req.params.stop_token_ids
        return (eos, *req.params.stop_token_ids)

    @staticmethod
    def _decode_options(req: Request) -> DecodeOptions:
        return DecodeOptions(req.params.skip_special_tokens, req.params.spaces_between_special_tokens)

    def _release_text(self, req: Request, final: bool) -> tuple[str, bool]:
        """The text the newest token lets the client see, and whether a stop string was hit. A
        stop token's own text is not part of the output (vLLM's), unless include_stop_str_in_output;
        stop strings count only once min_tokens were generated."""
        ids = req.generated[:-1] if req.dropped_stop_token else req.generated
        text = next_text(self.tokenizer, ids, req.detok, final=final, options=self._decode_options(req))
        stopped = False
        if req.stop is not None and len(req.generated) > req.params.min_tokens:
            text, stopped = req.stop.push(text, final=final)
        req.text += text
        return text, stopped

    def _logprob_entries(self, rows: torch.Tensor, token_ids: list[int], num_top: int) -> list[dict]:
        """One {token_id, token, logprob, top_logprobs} per row: the chosen token's log-probability
        and the `num_top` most likely, each token's text decoded alone (vLLM's)."""
        return [{"token_id": tid, "token": self._token_text(tid), "logprob": lp,
                 "top_logprobs": [{"token_id": i, "token": self._token_text(i), "logprob": v} for i, v in top]}
                for tid, (lp, top) in zip(token_ids, logprobs_of(rows, token_ids, num_top))]

    def _token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _done(self, req: Request, reason: str) -> None:
        timings = req.timings()
        self.observer.on_finished(timings)
        req.sink({"type": "done", **self._result(req, reason, timings)})
        if self.config.enable_kv_reuse and not req.stateless:
            req.status = Status.COMPLETING  # one more step writes the last token's KV
        else:
            # A stateless entry goes back to the prefix index before `done` can reach the client,
            # so the conversation's next request finds it; that request computes the last token.
            self._finish(req)

    def _result(self, req: Request, reason: str, timings: RequestTimings) -> dict:
        ms = 1000.0
        return {
            "seq_id": req.public_id or req.seq_id, "worker_id": self.config.worker_id,
            "text": req.text if req.stop is not None else self._final_text(req),
            "finish_reason": reason,
            "usage": {"prompt_tokens": req.prompt_tokens, "cached_tokens": req.cached_tokens,
                      "handoff_tokens": req.handoff_tokens, "tier_tokens": req.tier_tokens,
                      "completion_tokens": len(req.generated),
                      "context_tokens": req.context_tokens},
            "timings": {"ttft_ms": timings.ttft_s * ms, "prefill_ms": timings.prefill_s * ms,
                        "decode_ms": timings.decode_s * ms},
        }

    def _final_text(self, req: Request) -> str:
        ids = req.generated[:-1] if req.dropped_stop_token else req.generated
        return decode(self.tokenizer, ids, self._decode_options(req))

    def _finish(self, req: Request) -> None:
        if req.status is Status.FINISHED:  # the entry is released once (it may be adopted next)
            return
        req.status = Status.FINISHED
        self.scheduler.remove(req)
        if req.entry is not None:
            self._keep_reusable_kv(req.entry)
            if not self.config.enable_kv_reuse:
                self.store.drop_kv(req.entry)
            elif self.tiers is not None and req.entry.kv is not None and not req.aborted:
                self.tiers.write_behind(req.entry)
            self.store.release(req.entry)

    def _drop(self, req: Request) -> None:
        """An aborted request: its sequence keeps the tokens generated so far."""
        if req.status in (Status.WAITING, Status.RUNNING):
            self.counters["aborted"] += 1
        self._finish(req)

    def _fail_batch(self, batch: list[ScheduledItem], exc: Exception) -> None:
        with self.lock:
            for item in batch:
                self._fail(item.request, exc)

    def _fail(self, req: Request, exc: Exception) -> None:
        if req.status is Status.FINISHED:
            return
        if req.status is Status.RUNNING:
            req.sink({"type": "error", "error": {"type": "internal_error",
                                                 "message": f"generation failed: {exc}"}})
        elif req.status is Status.WAITING:
            req.sink(ServiceError(f"generation failed: {exc}"))
        if req.entry is not None:
            self.store.drop_kv(req.entry)  # possibly half written: recompute next time
        self._finish(req)
