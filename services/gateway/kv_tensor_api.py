"""The KV tensor API on the gateway (POST /kv/put, /kv/get, /kv/append, GET /kv/{seq_id}/{layer}/length,
DELETE /kv/{seq_id}): each call goes to its seq_id's owner on the ring, the worker that /generate
routes that seq_id to (without bounded-load spills: the tensors live on the owner only).

API keys and tenants apply as for /generate: the worker is sent the tenant's internal seq_id
(tenants.internal_seq_id), and answers name the client's own. Bodies of megabytes are parsed, encoded and
decoded in a worker thread, not on the event loop. A worker that cannot be reached is a 503 (the
call is not sent to another worker: the tensors are not there)."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Request
from pydantic_core import from_json, to_json
from starlette.responses import Response

from services.common.errors import Unavailable, UpstreamError, error_body
from services.common.http import path_segment
from services.common.kv_tensor_schemas import (MAX_LAYERS, KVDeleteResponse, KVGetRequest, KVGetResponse,
                                               KVLengthResponse, KVWriteRequest, KVWriteResponse, body_doc,
                                               parsed_body)
from services.common.schemas import SEQ_ID_PATTERN
from services.common.hash_ring import EmptyRingError
from services.gateway.openapi_docs import errors
from services.gateway.routing import error_message
from services.gateway.tenants import internal_seq_id, tenant_in
from services.gateway.upstream import Saturated, Unreachable, UpstreamFailure

router = APIRouter(prefix="/kv", tags=["KV tensors"])
SeqIdPath = Annotated[str, Path(pattern=SEQ_ID_PATTERN)]
LayerPath = Annotated[int, Path(ge=0, lt=MAX_LAYERS)]
_JSON = {"Content-Type": "application/json"}
TENSOR_ERRORS = {400: {"description": "A tensor that is not what it declares (`invalid_tensor`: base64, shape, "
                                      "dtype, encoding), or an append that does not match the layer "
                                      "(`kv_shape_mismatch`)."},
                 413: {"description": "The body is over GATEWAY_MAX_BODY_BYTES (`request_too_large`), or a tensor "
                                      "or the seq_id over the worker's limits (`kv_too_large`)."}}


def _responses(model, *statuses: int, tensors: bool = False) -> dict:
    documented = {200: {"model": model}} | errors(*statuses)
    for status in (set(statuses) & set(TENSOR_ERRORS)) if tensors else ():
        documented[status] = documented[status] | TENSOR_ERRORS[status]
    return documented


WRITE_RESPONSES = _responses(KVWriteResponse, 400, 401, 413, 422, 502, 503, tensors=True)


@router.post("/put", response_model=None, responses=WRITE_RESPONSES, openapi_extra=body_doc(KVWriteRequest))
async def put(request: Request) -> Response:
    """Stores the layer's K and V ([seq_len, num_heads, head_dim]), replacing what it held."""
    body = await parsed_body(request, KVWriteRequest)
    return await _forward(request, "POST", "/kv/put", body.seq_id, body.model_dump())


@router.post("/append", response_model=None, responses=WRITE_RESPONSES, openapi_extra=body_doc(KVWriteRequest))
async def append(request: Request) -> Response:
    """Adds positions at the end of the layer's K and V (a put if it holds nothing)."""
    body = await parsed_body(request, KVWriteRequest)
    return await _forward(request, "POST", "/kv/append", body.seq_id, body.model_dump())


@router.post("/get", response_model=None, responses=_responses(KVGetResponse, 401, 404, 413, 422, 502, 503),
             openapi_extra=body_doc(KVGetRequest))
async def get(request: Request) -> Response:
    body = await parsed_body(request, KVGetRequest)
    return await _forward(request, "POST", "/kv/get", body.seq_id, body.model_dump())


@router.get("/{seq_id}/{layer}/length", response_model=None,
            responses=_responses(KVLengthResponse, 401, 422, 502, 503))
async def length(seq_id: SeqIdPath, layer: LayerPath, request: Request) -> Response:
    """The layer's seq_len; 0 when it holds nothing."""
    return await _forward(request, "GET", f"/kv/{{seq_id}}/{layer}/length", seq_id)


@router.delete("/{seq_id}", response_model=None, responses=_responses(KVDeleteResponse, 401, 422, 502, 503))
async def delete(seq_id: SeqIdPath, request: Request) -> Response:
    """Removes every layer of the seq_id from its worker's KV tensor store."""
    return await _forward(request, "DELETE", "/kv/{seq_id}", seq_id)


async def _forward(request: Request, method: str, path: str, public_seq_id: str,
                   payload: dict | None = None) -> Response:
    proxy = request.app.state.proxy
    seq_id = internal_seq_id(tenant_in(request.scope), public_seq_id)
    try:
        view = proxy.ring.current()
        worker_id = view.owner(seq_id)
    except EmptyRingError as exc:
        raise Unavailable(str(exc), retry_after_s=1) from None
    url = view.addresses[worker_id].rstrip("/") + path.format(seq_id=path_segment(seq_id))
    data = None if payload is None else await asyncio.to_thread(_dumps, payload | {"seq_id": seq_id})
    try:
        # proxy._client: the gateway's one upstream client, which GatewayProxy holds
        upstream = await proxy._client.request(method, url, data=data, headers=_JSON if data else None)
        content = await upstream.read()
    except Saturated as exc:
        raise Unavailable(f"gateway has no free connection to worker {worker_id}: {exc}", retry_after_s=1) from exc
    except Unreachable as exc:
        proxy.ring.refresh_now()
        raise Unavailable(f"worker {worker_id} unreachable: {exc}", retry_after_s=1) from exc
    except UpstreamFailure as exc:
        raise UpstreamError(f"worker {worker_id} failed: {exc}") from exc
    status, content = await asyncio.to_thread(_for_client, upstream.status, content, public_seq_id)
    retry_after = upstream.headers.get("retry-after")
    return Response(content, status_code=status, media_type="application/json",
                    headers={"Retry-After": retry_after} if retry_after else None)


def _dumps(body: dict) -> bytes:
    return to_json(body)  # pydantic's encoder: 1 ms for 2 MB of base64, where json.dumps takes 16


def _loads(content: bytes):
    try:
        return from_json(content)
    except ValueError:
        return None


def _for_client(status: int, content: bytes, public_seq_id: str) -> tuple[int, bytes]:
    """The worker's answer with the client's own seq_id; one that is not JSON of the right kind
    becomes a 502 in the project's error shape."""
    body = _loads(content)
    if 200 <= status < 300 and isinstance(body, dict) and "error" not in body:
        return status, _dumps(body | {"seq_id": public_seq_id})
    if status == 401:  # the worker refused the gateway's own token: a fault of the cluster, not the client's
        return 502, _dumps(error_body(UpstreamError.error_type, "worker refused the gateway's internal token"))
    if status >= 400 and error_message(body) is not None:
        return status, content
    return 502, _dumps(error_body(UpstreamError.error_type, f"worker answered HTTP {status} with an invalid body"))
