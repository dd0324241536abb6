"""KV handoff, receiving side: pull a sequence's KV from an earlier owner instead of recomputing.

The first source that answers with a matching model fingerprint and token ids that are a prefix
of the session store's history wins; its KV is imported within this worker's own budget, and the
source is then told to free its copy. Anything else (gone, slow, mismatched, no room) means the
engine recomputes, with identical output.
"""

import asyncio
import logging
import time
from collections.abc import Callable

import httpx

from services.common.http import path_segment
from services.common.schemas import WorkerRef
from services.worker.engine.engine import Engine
from services.worker.kv.transfer import (KVFormatError, KVHeader, as_kv, expected_data_bytes, header_length,
                                         parse_header)
from services.worker.turns import Turn

logger = logging.getLogger(__name__)

PULL_TIMEOUT = httpx.Timeout(connect=1.0, read=5.0, write=5.0, pool=1.0)


class HandoffSkipped(Exception):
    """This source's KV is not usable here (a reason for the log, not an error)."""


class KVPuller:
    def __init__(self, client: httpx.AsyncClient, engine: Engine, self_id: str, fingerprint: dict,
                 headers: dict[str, str], on_pulled: Callable[[float], None] = lambda seconds: None):
        self.client = client
        self.engine = engine
        self.self_id = self_id
        self.fingerprint = fingerprint
        self.headers = headers
        self.on_pulled = on_pulled  # the duration of each successful pull, in seconds
        self._frees: set[asyncio.Task] = set()

    async def pull(self, turn: Turn, sources: list[WorkerRef], reserve_tokens: int) -> int:
        """Positions imported (0: none). Only pulls when earlier turns are not all cached here."""
        have = await asyncio.to_thread(self.engine.cached_prefix, turn.seq_id, turn.token_ids)
        if have >= turn.earlier_tokens:
            return 0
        for source in sources:
            if source.worker_id == self.self_id:
                continue
            started = time.perf_counter()
            try:
                n = await self._pull_from(source, turn, have, reserve_tokens)
            except (httpx.HTTPError, HandoffSkipped, KVFormatError) as exc:
                logger.info("no KV handoff for %s from %s: %s", turn.seq_id, source.worker_id, exc)
                continue
            if n:
                elapsed_s = time.perf_counter() - started
                self.on_pulled(elapsed_s)
                logger.info("pulled %d positions of %s from %s in %.0f ms", n, turn.seq_id,
                            source.worker_id, elapsed_s * 1000)
                self._free_at(source, turn.seq_id)
                return n
        return 0

    async def _pull_from(self, source: WorkerRef, turn: Turn, have: int, reserve_tokens: int) -> int:
        url = kv_url(source, turn.seq_id)
        async with self.client.stream("GET", url, headers=self.headers, timeout=PULL_TIMEOUT) as resp:
            if resp.status_code != 200:
                raise HandoffSkipped(f"HTTP {resp.status_code}")
            chunks = resp.aiter_raw()
            header, rest = await self._read_header(chunks)
            self._check(header, turn, have)
            data = await _read_exactly(chunks, rest, header.data_bytes)
        layout = self.engine.store.layout
        return await asyncio.to_thread(self.engine.import_kv, turn.seq_id, header.token_ids,
                                       as_kv(data, layout, len(header.token_ids)), reserve_tokens)

    @staticmethod
    async def _read_header(chunks) -> tuple[KVHeader, bytes]:
        buf = b""
        async for chunk in chunks:
            buf += chunk
            size = header_length(buf)
            if size is not None and len(buf) >= size:
                return parse_header(buf[:size]), buf[size:]
        raise KVFormatError("stream ended inside the header")

    def _check(self, header: KVHeader, turn: Turn, have: int) -> None:
        n = len(header.token_ids)
        if header.fingerprint != self.fingerprint:
            raise HandoffSkipped(f"model mismatch: {header.fingerprint} vs {self.fingerprint}")
        if n <= have or n > turn.earlier_tokens or turn.token_ids[:n] != header.token_ids:
            raise HandoffSkipped(f"its {n} positions are not a longer prefix of the history")
        if header.data_bytes != expected_data_bytes(self.engine.store.layout, n):
            raise KVFormatError(f"{header.data_bytes} data bytes for {n} positions")

    def _free_at(self, source: WorkerRef, seq_id: str) -> None:
        url = kv_url(source, seq_id)

        async def free() -> None:
            try:
                await self.client.delete(url, headers=self.headers, timeout=PULL_TIMEOUT)
            except httpx.HTTPError as exc:
                logger.info("could not tell %s to free %s: %s", source.worker_id, seq_id, exc)

        task = asyncio.create_task(free())
        self._frees.add(task)
        task.add_done_callback(self._frees.discard)


def kv_url(source: WorkerRef, seq_id: str) -> str:
    return f"{source.address.rstrip('/')}/internal/sequences/{path_segment(seq_id)}/kv"


async def _read_exactly(chunks, first: bytes, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    got = min(len(first), size)
    view[:got] = first[:got]
    async for chunk in chunks:
        end = got + len(chunk)
        if end > size:
            raise KVFormatError("more data than the header announced")
        view[got:end] = chunk
        got = end
    if got != size:
        raise KVFormatError(f"stream ended after {got} of {size} data bytes")
    return data
