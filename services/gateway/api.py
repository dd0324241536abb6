"""Thin routes of the public gateway; the work is in proxy.GatewayProxy."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from starlette.responses import PlainTextResponse, Response

from services.common.errors import ServiceError, error_response
from services.common.metrics import metrics_response
from services.common.schemas import SEQ_ID_PATTERN, GenerateRequest
from services.gateway.idempotency import IDEMPOTENCY_HEADER, turn_id
from services.gateway.tenants import internal_seq_id, tenant_in
from services.gateway.openapi_docs import GENERATE_RESPONSES, METRICS_RESPONSES, errors
from services.gateway.proxy import GatewayProxy

router = APIRouter()
SeqId = Annotated[str, Path(pattern=SEQ_ID_PATTERN)]
IdempotencyKey = Annotated[str | None, Header(
    alias=IDEMPOTENCY_HEADER, description="The turn's id: a repeat of a stored turn never appends again; it gets 409 "
    "`duplicate_turn` with that turn's outcome. 1-128 visible ASCII characters.")]
DELETE_RESPONSES = {200: {"description": "Removed from the session store and every worker's KV."}} | errors(
    401, 404, 409, 422, 502, 503)
OUTCOME_RESPONSES = {200: {"description": "History length, whether a turn is open, the last turns' outcomes."}} | \
    errors(401, 404, 422, 502, 503)


def _proxy(request: Request) -> GatewayProxy:
    return request.app.state.proxy


@router.post("/generate", response_model=None, responses=GENERATE_RESPONSES)
async def generate(body: GenerateRequest, request: Request, idempotency_key: IdempotencyKey = None) -> Response:
    """Documents /generate and answers what fast_generate passes on (an invalid body: its 422)."""
    return await generate_response(_proxy(request), body, idempotency_key, tenant_in(request.scope))


async def generate_response(proxy: GatewayProxy, body: GenerateRequest, idempotency_key: str | None,
                            tenant: str | None) -> Response:
    """A turn's response, whichever path validated its body (this route, or fast_generate). The
    turn's id is the client's Idempotency-Key, or one made here: either way one id for every
    attempt of this request (re-sends, re-routes, migration), so no attempt appends twice."""
    seq_id = body.seq_id or uuid.uuid4().hex
    payload = body.model_dump(exclude_unset=True) | {"seq_id": internal_seq_id(tenant, seq_id), "stream": body.stream}
    if tenant is not None:
        payload["public_seq_id"] = seq_id
    try:
        payload["request_id"] = turn_id(idempotency_key)
        response = await proxy.generate(payload, stream=body.stream)
    except ServiceError as exc:
        response = error_response(exc)
    response.headers["X-Seq-Id"] = seq_id
    return response


@router.delete("/sequences/{seq_id}", response_model=None, responses=DELETE_RESPONSES)
async def delete_sequence(seq_id: SeqId, request: Request) -> Response:
    return await _proxy(request).delete_sequence(internal_seq_id(tenant_in(request.scope), seq_id))


@router.get("/sequences/{seq_id}", response_model=None, responses=OUTCOME_RESPONSES)
async def sequence_outcomes(seq_id: SeqId, request: Request) -> Response:
    """The sequence's length and the outcomes of its last turns (by turn id: a request's
    Idempotency-Key), for a client that lost a reply and must know whether its turn was stored."""
    return await _proxy(request).sequence_outcomes(internal_seq_id(tenant_in(request.scope), seq_id), seq_id)


@router.get("/stats", responses=errors(401, 502, 503))
async def stats(request: Request) -> dict:
    return await _proxy(request).cluster_stats()


@router.get("/health")
async def health(request: Request) -> dict:
    """200 while the gateway can route: `degraded` when it routes with its last ring because the
    coordinator cannot be reached (`ring` says since when and why)."""
    ring = _proxy(request).ring.health()
    return {"status": "degraded" if ring["coordinator"] != "ok" else "ok", "ring": ring}


@router.get("/metrics", response_class=PlainTextResponse, responses=METRICS_RESPONSES)
async def metrics(request: Request) -> Response:
    return metrics_response(request.app.state.metrics.registry)
