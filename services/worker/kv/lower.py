"""The tiers below device memory, together: what the engine and the routes call.

- `spill` (engine thread, at a device eviction): the evicted buffer goes to a writer thread,
  which keeps its chunks in host memory, and what host memory evicts goes to the disk tier. No
  copy on the engine thread: the buffer is no longer the sequence's, so nothing writes it.
- `write_behind` (engine thread, when a request ends): the positions the shared tier does not
  have yet (the new ones, plus the chunk they start in) are queued for the writer, which copies
  them from the live buffer and discards the copy if those positions were given up meanwhile.
  The queue is bounded; when it is full the job is dropped and counted, never waited for.
- `prefetch` (a request's thread, while the request waits in the queue): finds the longest prefix of
  the request's ids in host, disk or shared chunks and reads them; they travel with the request
  (nothing evicts them before it is admitted; the bytes read, at most 4 model windows across
  waiting requests, are freed with it). At admission the engine thread's `load_into` copies
  them into the sequence's KV, a memory copy.
"""

import collections
import logging
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from services.worker.cpu_threads import confine_to_one_thread
from services.worker.kv import chunks as ck
from services.worker.kv.chunks import ChunkRef, ChunkRejected
from services.worker.kv.store import KVLayout, SequenceEntry
from services.worker.kv.tiers import DiskTier, HostTier

logger = logging.getLogger(__name__)

TIERS = ("host", "disk", "shared")
_NO_DATA = torch.empty(0)


@dataclass
class Chunk:
    ref: ChunkRef
    ids: list[int]
    data: torch.Tensor  # [layers, 2, kv_heads, n, head_dim], on the CPU

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


class TierObserver:
    """Told each tier load and store, with its duration (any thread; prometheus is thread-safe)."""

    def on_load(self, tier: str, seconds: float, nbytes: int) -> None:
        """A chunk read from `tier`."""

    def on_store(self, tier: str, seconds: float, nbytes: int) -> None:
        """A chunk written to `tier`."""


@dataclass
class TierCounts:
    hits: int = 0  # chunks found
    misses: int = 0  # chunks asked for and not there
    tokens_loaded: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    rejected: int = 0  # stored bytes that were not the chunk asked for: ignored
    errors: int = 0  # the store failed (I/O, network)


@dataclass(eq=False)
class Prefetched:
    """A request's chunks, read before it was queued: they travel with it (so nothing evicts
    them before admission) and are freed with it."""
    chunks: list[Chunk] = field(default_factory=list)  # contiguous from the first one

    @property
    def end(self) -> int:
        return self.chunks[-1].ref.end if self.chunks else 0


class LowerTiers:
    def __init__(self, layout: KVLayout, fp: dict, host: HostTier, disk: DiskTier | None, shared,
                 queue_size: int = 64, observer: TierObserver | None = None, staging_windows: int = 4):
        self.layout = layout
        self.fp = fp
        self.root = ck.fingerprint_key(fp)
        self.host, self.disk, self.shared = host, disk, shared
        self.observer = observer or TierObserver()
        self.counts = {name: TierCounts() for name in TIERS}
        self.dropped_jobs = 0
        self.discarded_writes = 0  # write-behinds whose positions were rewritten before the copy
        self.tokens_loaded = 0  # into device KV by load_into
        # Bytes read from disk or shared for requests not admitted yet: at most this many model
        # windows of KV; past it a request reads no more and computes the rest.
        self.staged_bytes = 0
        self.staging_limit = staging_windows * layout.max_positions * layout.bytes_per_token
        self._lock = threading.Lock()  # the counters
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._forgets: collections.deque[list[int]] = collections.deque()  # DELETEd sequences' ids
        self._thread = threading.Thread(target=self._write_loop, name="kv-tiers", daemon=True)
        self._thread.start()

    # --- engine thread -------------------------------------------------------------------
    def spill(self, entry: SequenceEntry) -> None:
        """A device eviction: the entry's KV goes down a tier instead of being dropped."""
        n = entry.num_cached
        if n:
            shared = entry.shared_tokens if self.shared is not None and self.shared.local else 0
            self._enqueue(("spill", entry.token_ids[:n], entry.kv.data, n, shared))

    def write_behind(self, entry: SequenceEntry) -> None:
        """A request ended: queue the chunks of the entry's KV the shared tier lacks. No copy
        here: the writer copies them from the live buffer, and discards the copy if the
        buffer's positions were given up meanwhile (`SequenceKV.epoch`)."""
        n = entry.num_cached
        if self.shared is None or n <= entry.shared_tokens:
            return
        start = entry.shared_tokens - entry.shared_tokens % ck.CHUNK_TOKENS
        if self._enqueue(("share", entry.token_ids[:n], entry.kv, entry.kv.epoch, start)):
            entry.shared_tokens = n

    def forget(self, token_ids: Sequence[int]) -> None:
        """A deleted sequence: its chunks leave every tier (queued). That includes the tails its
        earlier turns wrote, and any prefix chunks other sequences shared (a cache loss only)."""
        self._forgets.append(list(token_ids))  # never dropped, unlike the bounded queue's writes
        try:
            self._jobs.put_nowait(("wake",))
        except queue.Full:
            pass  # the writer is busy: it takes the deletions after its current job

    def load_into(self, entry: SequenceEntry, prefetched: Prefetched | None) -> int:
        """Copy prefetched chunks past the entry's cached positions into its KV (reserved by the
        caller up to at least `prefetched.end`); returns the positions added."""
        if prefetched is None or entry.kv is None:
            return 0
        have = before = entry.num_cached
        for chunk in prefetched.chunks:
            ref = chunk.ref
            if ref.end <= have:
                continue
            if ref.start > have or entry.token_ids[ref.start:ref.end] != chunk.ids:
                break
            offset = have - ref.start  # [layers, 2, kv_heads, n, head_dim] -> positions have..end
            entry.kv.data[:, :, :, have:ref.end].copy_(chunk.data[:, :, :, offset:], non_blocking=True)
            have = entry.kv.num_tokens = ref.end
        with self._lock:
            self.tokens_loaded += have - before
        return have - before

    # --- request threads -----------------------------------------------------------------
    def prefetch(self, token_ids: Sequence[int], have: int, limit: int) -> Prefetched:
        """The chunks of the longest stored prefix of `token_ids[:limit]` past position `have`
        (from host memory, or read from disk or shared). Each store is asked once for all the
        full chunks, then once for the tail chunks that may follow the last one found."""
        result = Prefetched()
        if limit - have < 1:
            return result
        staged = [0]
        weakref.finalize(result, self._unstage, staged)
        full = ck.chunk_refs(self.root, token_ids, limit, tail=False)
        result.chunks = [Chunk(r, [], _NO_DATA) for r in full if r.end <= have]  # device memory has these
        wanted = [r for r in full if r.end > have]
        where = self._locate(wanted, count_misses=True)
        for ref in wanted:
            chunk = self._load(ref, where.get(ref.key), token_ids, staged)
            if chunk is None:
                break  # a stored sequence may end inside this chunk: its tail chunk
            result.chunks.append(chunk)
        parent = ck.parent_key(self.root, [c.ref for c in result.chunks])
        tails = [t for t in ck.tail_candidates(parent, token_ids, result.end, limit) if t.end > have]
        where = self._locate(tails, count_misses=False)
        tail = next((t for t in tails if t.key in where), None)  # the longest stored
        chunk = self._load(tail, where[tail.key], token_ids, staged) if tail else None
        if chunk is not None:
            result.chunks.append(chunk)
        return result

    def _locate(self, refs: list[ChunkRef], count_misses: bool) -> dict[str, str]:
        """Which tier holds each chunk (the fastest that has it)."""
        where: dict[str, str] = {}
        for name, store in (("host", self.host), ("disk", self.disk), ("shared", self.shared)):
            keys = [r.key for r in refs if r.key not in where]
            if store is None or not keys:
                continue
            present = self._contains(name, store, keys)
            where.update((key, name) for key, there in zip(keys, present) if there)
            if count_misses:
                self._count(name, misses=present.count(False))
        return where

    def _contains(self, name: str, store, keys: list[str]) -> list[bool]:
        if name != "shared":
            return [key in store for key in keys]
        try:
            return store.contains(keys)
        except Exception as exc:  # noqa: BLE001 - a shared tier that is down only costs reuse
            self._count(name, errors=1)
            logger.info("shared KV tier unavailable: %s", exc)
            return [False] * len(keys)

    def _load(self, ref: ChunkRef, tier: str | None, token_ids: Sequence[int], staged: list[int]) -> Chunk | None:
        if tier == "host":
            chunk = self.host.get(ref.key)  # None if evicted since
            if chunk is not None:
                self._count("host", hits=1)
            return chunk
        if tier is None or not self._stage(staged, self.layout.bytes_per_token * ref.num_tokens):
            return None
        return self._read(tier, self.disk if tier == "disk" else self.shared, ref, list(token_ids[ref.start:ref.end]))

    def _stage(self, staged: list[int], nbytes: int) -> bool:
        with self._lock:
            if self.staged_bytes + nbytes > self.staging_limit:
                return False
            self.staged_bytes += nbytes
            staged[0] += nbytes
            return True

    def _unstage(self, staged: list[int]) -> None:
        with self._lock:
            self.staged_bytes -= staged[0]

    def _read(self, name: str, store, ref: ChunkRef, ids: list[int]) -> Chunk | None:
        started = time.perf_counter()
        try:
            raw = store.get(ref.key)
            if raw is None:
                self._count(name, misses=1)
                return None
            data = ck.decode(raw, ref, self.fp, ids, self.layout)
        except ChunkRejected as exc:
            logger.warning("ignored a %s KV chunk: %s", name, exc)
            self._count(name, rejected=1)
            store.remove(ref.key)
            return None
        except Exception as exc:  # noqa: BLE001 - I/O or network: recompute instead
            logger.info("could not read a %s KV chunk: %s", name, exc)
            self._count(name, errors=1)
            return None
        self.observer.on_load(name, time.perf_counter() - started, len(raw))
        self._count(name, hits=1, tokens_loaded=ref.num_tokens, bytes_loaded=len(raw))
        return Chunk(ref, ids, data)

    def _keep_in_host(self, chunk: Chunk) -> None:
        for old in self.host.put(chunk.ref.key, chunk):
            if old is not chunk:
                self._to_disk(old)

    # --- the writer thread ---------------------------------------------------------------
    def _enqueue(self, job: tuple) -> bool:
        try:
            self._jobs.put_nowait(job)
            return True
        except queue.Full:
            with self._lock:
                self.dropped_jobs += 1
            return False

    def _write_loop(self) -> None:
        confine_to_one_thread()  # its copies must not start a thread team beside the engine's
        while True:
            job = self._jobs.get()
            try:
                while self._forgets:  # deletions first: a chunk must not outlive its DELETE
                    self._forget(self._forgets.popleft())
                if job[0] == "spill":
                    self._spill(*job[1:])
                elif job[0] == "share":
                    self._share(*job[1:])
            except Exception:  # noqa: BLE001 - a failed write costs reuse, never the worker
                logger.exception("KV tier write failed")
            finally:
                self._jobs.task_done()

    def _spill(self, ids: list[int], kv: torch.Tensor, n: int, shared: int) -> None:
        """`shared`: positions a shared tier on this host's own disk holds (not copied again)."""
        for ref in ck.chunk_refs(self.root, ids, n):
            if ref.end <= shared or ref.key in self.host or (self.disk is not None and ref.key in self.disk):
                continue
            chunk = Chunk(ref, ids[ref.start:ref.end], ck.chunk_kv(kv, ref))
            started = time.perf_counter()
            self._keep_in_host(chunk)
            self.observer.on_store("host", time.perf_counter() - started, chunk.nbytes)
            self._count("host", bytes_stored=chunk.nbytes)

    def _share(self, ids: list[int], kv, epoch: int, start: int) -> None:
        """Writes the chunks from `start` on that the shared tier lacks (another worker, or this
        one before a handoff or an eviction, may have written the same prefix)."""
        chunks = [Chunk(ref, ids[ref.start:ref.end], ck.chunk_kv(kv.data, ref))
                  for ref in ck.chunk_refs(self.root, ids, len(ids)) if ref.start >= start]
        if kv.epoch != epoch:  # positions rewritten during the copy: not this sequence's KV any more
            with self._lock:
                self.discarded_writes += 1
            return
        try:
            present = self.shared.contains([c.ref.key for c in chunks])
        except Exception as exc:  # noqa: BLE001 - then write them all; failures are counted there
            logger.info("shared KV tier unavailable: %s", exc)
            present = [False] * len(chunks)
        for chunk, there in zip(chunks, present):
            if not there:
                self._store("shared", self.shared, chunk)

    def _forget(self, ids: list[int]) -> None:
        full = ck.chunk_refs(self.root, ids, len(ids), tail=False)
        keys = [ref.key for ref in full]
        for i, start in enumerate(range(0, len(ids), ck.CHUNK_TOKENS)):  # full[:i] end at start
            keys += [ref.key for ref in ck.tail_candidates(ck.parent_key(self.root, full[:i]), ids, start, len(ids))]
        for store in (self.host, self.disk, self.shared):
            if store is None:
                continue
            for key in keys:
                try:
                    store.remove(key)
                except Exception as exc:  # noqa: BLE001 - the TTL removes what this could not
                    logger.info("could not remove a KV chunk: %s", exc)
                    break

    def _to_disk(self, chunk: Chunk) -> None:
        if self.disk is not None and chunk.ref.key not in self.disk:
            self._store("disk", self.disk, chunk)

    def _store(self, name: str, store, chunk: Chunk) -> None:
        started = time.perf_counter()
        raw = ck.encode(chunk.ref, chunk.data, self.fp, chunk.ids)
        try:
            store.put(chunk.ref.key, raw)
        except Exception as exc:  # noqa: BLE001 - I/O or network: counted, the turn is unaffected
            logger.info("could not write a %s KV chunk: %s", name, exc)
            self._count(name, errors=1)
            return
        self.observer.on_store(name, time.perf_counter() - started, len(raw))
        self._count(name, bytes_stored=len(raw))

    def flush(self, timeout_s: float) -> bool:
        """Wait until the queued writes are done (a drain, tests); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._jobs.unfinished_tasks or self._forgets:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # --- numbers -------------------------------------------------------------------------
    def _count(self, tier: str, **deltas: int) -> None:
        with self._lock:
            counts = self.counts[tier]
            for name, delta in deltas.items():
                setattr(counts, name, getattr(counts, name) + delta)

    def stats(self) -> dict:
        with self._lock:
            tiers = {name: dict(vars(c)) for name, c in self.counts.items()}
            out = {"write_queue_depth": self._jobs.qsize(), "write_jobs_dropped": self.dropped_jobs,
                   "write_jobs_discarded": self.discarded_writes,
                   "tokens_loaded": self.tokens_loaded, "staged_bytes": self.staged_bytes}
        for name, store in (("host", self.host), ("disk", self.disk), ("shared", self.shared)):
            tiers[name]["enabled"] = store is not None
            if store is not None:
                tiers[name].update(store.stats())
        return {**out, "tiers": tiers}
