"""Worker HTTP routes: thin; the engine does the work."""

import asyncio
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from services.common.errors import Conflict, InvalidRequest, NotFound, ServiceError, Unavailable
from services.common.metrics import metrics_response
from services.common.schemas import GenerateRequest, check_seq_id
from services.common.sse import encode_event
from services.worker.engine.engine import Engine
from services.worker.engine.sequence import SamplingParams
from services.worker.streams import RequestHandle

router = APIRouter()


def _engine(request: Request) -> Engine:
    state = request.app.state.worker
    if state.engine is None:
        detail = state.load_error or "model is loading"
        raise Unavailable(f"worker not ready: {detail}", retry_after_s=None if state.load_error else 2)
    return state.engine


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    state = request.app.state.worker
    engine = _engine(request)
    if body.model_name is not None and body.model_name != state.settings.model_name:
        raise InvalidRequest(f"model '{body.model_name}' is not served here; this worker serves "
                             f"'{state.settings.model_name}'")
    seq_id = body.seq_id or uuid.uuid4().hex
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature,
                            top_p=body.top_p, seed=body.seed)
    handle = RequestHandle(engine, seq_id, body.prompt, params)
    metrics = state.metrics
    try:
        handle.submit()
        start = await handle.first_event()
    except ServiceError as exc:
        metrics.http_requests.labels(exc.error_type).inc()
        raise
    except BaseException:
        handle.abort()
        raise
    metrics.http_requests.labels("accepted").inc()
    headers = {"X-Seq-Id": seq_id}
    if not body.stream:
        return JSONResponse(await _collect(handle, metrics), headers=headers)
    return EventSourceResponse(_stream(handle, start, metrics), headers=headers, ping=15)


async def _stream(handle: RequestHandle, start: dict, metrics):
    try:
        yield encode_event(start)
        async for event in handle.events():
            if event["type"] == "done":
                metrics.ttft.observe(event["timings"]["ttft_ms"] / 1000)
            yield encode_event(event)
    finally:
        handle.abort()  # client went away mid-stream: the engine drops it at its next step


async def _collect(handle: RequestHandle, metrics) -> dict:
    try:
        async for event in handle.events():
            if event["type"] == "error":
                raise ServiceError(event["error"]["message"])
            if event["type"] == "done":
                metrics.ttft.observe(event["timings"]["ttft_ms"] / 1000)
                return {k: v for k, v in event.items() if k != "type"}
    finally:
        handle.abort()
    raise ServiceError("generation ended without a result")


@router.delete("/sequences/{seq_id}")
async def delete_sequence(seq_id: str, request: Request):
    check_seq_id(seq_id)
    deleted = await asyncio.to_thread(_engine(request).delete_sequence, seq_id)
    if deleted is None:
        raise Conflict(f"sequence '{seq_id}' has a request running; retry after it ends")
    if not deleted:
        raise NotFound(f"unknown sequence '{seq_id}'")
    return {"seq_id": seq_id, "deleted": True}


@router.get("/stats")
async def stats(request: Request):
    state = request.app.state.worker
    s = state.settings
    base = {"worker_id": s.worker_id, "model_name": s.model_name, "ready": state.engine is not None,
            "enable_kv_reuse": s.enable_kv_reuse}
    return {**base, **(await asyncio.to_thread(state.engine.stats) if state.engine else {})}


@router.get("/health")
async def health(request: Request):
    state = request.app.state.worker
    failure = state.load_error or (state.engine and not state.engine.alive and "engine thread stopped")
    if failure:  # liveness fails so an orchestrator restarts the worker
        return JSONResponse({"status": "failed", "error": failure}, status_code=503)
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    _engine(request)
    return {"status": "ready", "worker_id": request.app.state.worker.settings.worker_id}


@router.get("/metrics")
async def metrics(request: Request):
    return metrics_response(request.app.state.worker.metrics.registry)
