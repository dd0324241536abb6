"""Routes only other workers and the operator use: KV export for handoff, and drain. They expose
conversation content, so they require the bearer token when WORKER_INTERNAL_TOKEN is set; the
gateway never forwards /internal/*."""

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.common.errors import NotFound
from services.common.schemas import check_seq_id
from services.worker.kv.transfer import data_pieces, encode_header

router = APIRouter(prefix="/internal")

KV_MEDIA_TYPE = "application/vnd.kvcache.kv+safetensors"


class PinnedKVResponse(StreamingResponse):
    """Streams a pinned KV buffer; unpins it however the response ends (sent, client gone)."""

    def __init__(self, content, length: int, unpin) -> None:
        super().__init__(content, media_type=KV_MEDIA_TYPE, headers={"Content-Length": str(length)})
        self._unpin = unpin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._unpin()


@router.get("/sequences/{seq_id}/kv", response_model=None)
async def export_kv(seq_id: str, request: Request) -> PinnedKVResponse:
    check_seq_id(seq_id)
    state = request.app.state.worker
    engine = state.require_engine()
    pinned = await asyncio.to_thread(engine.pin_for_export, seq_id)
    if pinned is None:
        raise NotFound(f"no KV to export for sequence '{seq_id}'")
    token_ids, kv = pinned
    header = encode_header(token_ids, state.fingerprint, engine.store.layout)
    length = len(header) + engine.store.layout.bytes_per_token * len(token_ids)

    async def body():
        yield header
        for piece in data_pieces(kv, len(token_ids)):
            yield piece

    return PinnedKVResponse(body(), length, lambda: engine.unpin(seq_id))


@router.delete("/sequences/{seq_id}/kv")
async def free_kv(seq_id: str, request: Request) -> dict:
    """The new owner imported this sequence's KV: this copy is no longer needed."""
    check_seq_id(seq_id)
    engine = request.app.state.worker.require_engine()
    freed = await asyncio.to_thread(engine.drop_sequence_kv, seq_id)
    return {"seq_id": seq_id, "freed": freed}


@router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> dict:
    """The gateway's POST /reset_prefix_cache, on this worker: the stateless entries (the /v1
    prefix cache) are dropped; conversations keep their KV."""
    state = request.app.state.worker
    engine = state.require_engine()
    return {"worker_id": state.settings.worker_id, **await asyncio.to_thread(engine.reset_prefix_cache)}


@router.post("/drain", status_code=202)
async def drain(request: Request) -> dict:
    state = request.app.state.worker
    state.start_drain()
    return drain_status(state)


@router.get("/drain")
async def drain_progress(request: Request) -> dict:
    return drain_status(request.app.state.worker)


def drain_status(state) -> dict:
    status = state.drainer.status
    engine = state.engine
    return {"draining": status.draining, "drained": status.drained,
            "open_turns": state.turns.num_open if state.turns else 0,
            "cached_sequences": engine.num_cached_sequences() if engine else 0}
