"""Worker HTTP routes: thin; the turn (session store), the handoff and the engine do the work."""

import asyncio
import uuid
from functools import partial

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.common.errors import Conflict, InvalidRequest, ModelNotFound, NotFound, ServiceError, Unavailable
from services.common.event_stream import EventStream
from services.common.metrics import metrics_response
from services.common.schemas import WorkerGenerateRequest, check_seq_id
from services.worker.engine.sequence import SamplingParams
from services.worker.streams import RequestHandle, collect_result, counted, start_request, stream_events
from services.worker.turns import Turn

# The gateway's routes (turns, outcomes, deletes): create_app guards them with the internal token,
# since every one reads or changes a sequence and /generate sends the token to the handoff sources
# it names. `open_router` holds the probes and the numbers.
router = APIRouter()
open_router = APIRouter()


@router.post("/generate")
async def generate(body: WorkerGenerateRequest, request: Request):
    state = request.app.state.worker
    engine = state.require_serving()
    served = state.settings.served_model_names
    if body.model_name is not None and body.model_name not in served:
        raise ModelNotFound(f"model '{body.model_name}' is not served here; this worker serves "
                            f"{', '.join(repr(name) for name in served)}", param="model_name")
    _check_resume(body)
    body.check_min_tokens(body.max_tokens)
    engine.check_token_ids(body.stop_token_ids, "stop_token_ids")
    seq_id = body.seq_id or uuid.uuid4().hex
    prompt_ids = await asyncio.to_thread(engine.encode, body.prompt)
    turn = await state.turns.begin(seq_id, body.request_id or uuid.uuid4().hex, prompt_ids,
                                   max_tokens=body.max_tokens, window=engine.window, resume=body.resume,
                                   decode=engine.decode)
    handle, start = await counted(state.metrics.http_requests, _start_turn(state, engine, turn, body))
    headers = {"X-Seq-Id": body.public_seq_id or seq_id}
    if not body.stream:
        result = await collect_result(handle, partial(_finish, state, turn, handle),
                                      partial(_close, state, turn, handle))
        return JSONResponse(result, headers=headers)
    start["prompt"] = body.prompt  # this turn's prompt text, as the reference implementation's start event
    return EventStream(_stream(state, turn, handle, start), headers=headers)


def _check_resume(body: WorkerGenerateRequest) -> None:
    if body.resume is not None and len(body.resume.generated_ids) >= body.max_tokens:
        raise InvalidRequest("resume.generated_ids must be fewer than max_tokens")
    if body.resume is not None and body.seq_id is None:
        raise InvalidRequest("resume needs the seq_id of the interrupted turn")


async def _start_turn(state, engine, turn: Turn, body: WorkerGenerateRequest) -> tuple[RequestHandle, dict]:
    """Pull the KV from an earlier owner if one has it, then submit; until `start`, a failure
    takes the turn back out of the history."""
    try:
        if not engine.store.fits(turn.earlier_tokens + turn.prompt_tokens + body.max_tokens):
            raise Unavailable("request too large for this worker's KV budget")
        if body.handoff_sources and state.settings.enable_kv_reuse:
            await state.puller.pull(turn, body.handoff_sources,
                                    reserve_tokens=len(turn.token_ids) - len(turn.resumed) + body.max_tokens)
        params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                                top_p=body.top_p, seed=body.seed, **body.sampling_kwargs())
        handle = RequestHandle.for_turn(engine, turn, params, body.public_seq_id)
        return handle, await start_request(handle)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await state.turns.cancel(turn)
        raise


async def _finish(state, turn: Turn, handle: RequestHandle, event: dict) -> dict:
    """Before `done` reaches the client, its tokens are in the session store; if they cannot be
    stored, the client gets an error event instead (never a silently shortened history)."""
    try:
        await state.turns.end(turn, handle.generated_ids, event.get("finish_reason") or "",
                              rollback_on_failure=True)
    except ServiceError as exc:
        return {"type": "error", "error": {"type": exc.error_type, "message": exc.message}}
    # the reference implementation's names for text and usage.completion_tokens
    return event | {"generated_text": event["text"], "tokens_generated": event["usage"]["completion_tokens"]}


async def _close(state, turn: Turn, handle: RequestHandle) -> None:
    """However the request ended (it is aborted in the engine): an open turn keeps what was
    generated."""
    if state.turns.is_open(turn):
        with anyio.CancelScope(shield=True):
            try:
                await state.turns.end(turn, handle.generated_ids, "abort", rollback_on_failure=False)
            except ServiceError:
                pass  # the store is down (a later write closes it) or the turn was taken over


def _stream(state, turn: Turn, handle: RequestHandle, start: dict):
    """The turn's SSE body; a client that goes away mid-stream aborts it in the engine."""
    return stream_events(handle, start, partial(_finish, state, turn, handle),
                         partial(_close, state, turn, handle))


@router.delete("/sequences/{seq_id}")
async def delete_sequence(seq_id: str, request: Request):
    """Removes the sequence from the session store and from this worker's KV."""
    check_seq_id(seq_id)
    state = request.app.state.worker
    local = await asyncio.to_thread(state.require_engine().delete_sequence, seq_id)
    if local is None:
        raise Conflict(f"sequence '{seq_id}' has a request running; retry after it ends")
    stored = await state.turns.delete(seq_id)
    if not (local or stored):
        raise NotFound("unknown sequence")
    return {"seq_id": seq_id, "deleted": True}


@router.get("/sequences/{seq_id}")
async def sequence_outcomes(seq_id: str, request: Request):
    """The sequence's length and its last turns' outcomes, so a client that lost a reply learns
    whether its turn was stored."""
    check_seq_id(seq_id)
    state = request.app.state.worker
    state.require_engine()
    return {"seq_id": seq_id, **await state.turns.describe(seq_id)}


@open_router.get("/stats")
async def stats(request: Request):
    state = request.app.state.worker
    s = state.settings
    base = {"worker_id": s.worker_id, "model_name": s.model_name, "ready": state.engine is not None,
            "enable_kv_reuse": s.enable_kv_reuse, "draining": state.drainer.draining,
            "in_flight": state.in_flight.count}
    kv_tensors = await asyncio.to_thread(request.app.state.kv_tensors.stats)
    return {**base, **kv_tensors, **(await asyncio.to_thread(state.engine.stats) if state.engine else {})}


@open_router.get("/inference/model/info")
async def model_info(request: Request):
    """The loaded model and its KV budget (the reference implementation's route, extended):
    `loaded` false, and no model_info, while the model loads or if it failed to."""
    state = request.app.state.worker
    s = state.settings
    base = {"loaded": state.engine is not None, "worker_id": s.worker_id}
    if state.engine is None:
        return base | {"model_name": s.model_name, "error": state.load_error}
    return base | await asyncio.to_thread(describe_model, state.engine, s.model_name, s.served_model_names)


def describe_model(engine, model_name: str, served_model_names: list[str]) -> dict:
    """Blocking (reads the engine's stats under its lock)."""
    layout = engine.store.layout
    stats = engine.stats()
    model_info = {"model_name": model_name, "served_model_names": served_model_names,
                  "architecture": type(engine.loaded.model).__name__, "num_layers": layout.num_layers,
                  "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim,
                  "device": str(layout.device), "dtype": str(layout.dtype).removeprefix("torch."),
                  "num_parameters": sum(p.numel() for p in engine.loaded.model.parameters()),
                  "max_model_len": engine.window}
    kv_cache = {"bytes_limit": stats["kv_bytes_limit"], "bytes_used": stats["kv_bytes_used"],
                "bytes_peak": stats["kv_bytes_peak"], "bytes_per_token": stats["kv_bytes_per_token"],
                "tokens_limit": stats["kv_bytes_limit"] // stats["kv_bytes_per_token"],
                "cached_tokens": stats["cached_tokens"], "cached_sequences": stats["cached_sequences"]}
    return {"model_info": model_info, "kv_cache": kv_cache}


@open_router.get("/health")
async def health(request: Request):
    state = request.app.state.worker
    failure = state.load_error or (state.engine and not state.engine.alive and "engine thread stopped")
    if failure:  # liveness fails so an orchestrator restarts the worker
        return JSONResponse({"status": "failed", "error": failure}, status_code=503)
    return {"status": "ok"}


@open_router.get("/ready")
async def ready(request: Request):
    state = request.app.state.worker
    state.require_serving()
    return {"status": "ready", "worker_id": state.settings.worker_id}


@open_router.get("/metrics")
async def metrics(request: Request):
    return metrics_response(request.app.state.worker.metrics.registry)
