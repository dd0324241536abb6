"""Thin HTTP routes over Membership; domain errors become the shared JSON error responses.

`membership_router` holds the calls workers make about themselves; create_app guards it with the
internal bearer token. `router` holds the open routes (lookups, health, metrics).
"""

import asyncio
import json
import re
from collections.abc import Callable

from fastapi import APIRouter, Query, Request, Response

from services.common.errors import InvalidRequest, NotFound, Unavailable
from services.common.metrics import metrics_response
from services.common.schemas import (WORKER_ID_PATTERN, DeregisterRequest, DrainRequest,
                                     HeartbeatRequest, RegisterRequest, RingState, RouteResponse, WorkerRef,
                                     check_seq_id)
from services.coordinator.membership import Membership, NoWorkers, UnknownWorker
from services.coordinator.metrics import CoordinatorMetrics

router = APIRouter()
membership_router = APIRouter()

_WORKER_ID_RE = re.compile(WORKER_ID_PATTERN)
MAX_RING_WAIT_S = 60.0
# Records in an answer above which it is serialised in a thread: a full ring of a thousand workers
# (a gateway's first sync) was 7 ms of validation and JSON on the loop, the /workers listing 4 ms.
LARGE_ANSWER_RECORDS = 100


def _membership(request: Request) -> Membership:
    return request.app.state.membership


def _metrics(request: Request) -> CoordinatorMetrics:
    return request.app.state.metrics


async def serialised(dump: Callable[[], str], records: int) -> str:
    """`dump()` on the loop for a small answer, in a thread for a large one (its objects are this
    request's own: nothing else touches them meanwhile)."""
    return dump() if records <= LARGE_ANSWER_RECORDS else await asyncio.to_thread(dump)


def parse_exclude(exclude: str) -> list[str]:
    """`a,b` → ["a", "b"]; an empty parameter excludes nothing."""
    worker_ids = exclude.split(",") if exclude else []
    for worker_id in worker_ids:
        if not _WORKER_ID_RE.fullmatch(worker_id):
            raise InvalidRequest("exclude must be comma-separated worker ids of 1-128 [A-Za-z0-9._:-]")
    return worker_ids


@membership_router.post("/register")
async def register(body: RegisterRequest, request: Request) -> dict:
    membership = _membership(request)
    info = membership.register(body.worker_id, body.address, body.model_name, draining=body.draining,
                               served_model_names=body.served_model_names, max_model_len=body.max_model_len)
    return {"worker_id": info.worker_id, "address": info.address, "model_name": info.model_name,
            "epoch": membership.epoch, "ttl_s": membership.ttl_s}


@membership_router.post("/heartbeat")
async def heartbeat(body: HeartbeatRequest, request: Request) -> dict:
    membership = _membership(request)
    try:
        membership.heartbeat(body.worker_id, body.load)
    except UnknownWorker as exc:
        _metrics(request).heartbeats.labels(outcome="unknown").inc()
        raise NotFound(f"{exc}; register again") from None
    _metrics(request).heartbeats.labels(outcome="ok").inc()
    return {"worker_id": body.worker_id, "epoch": membership.epoch}


@membership_router.post("/deregister")
async def deregister(body: DeregisterRequest, request: Request) -> dict:
    """Idempotent: an unknown worker gets 200 with removed=false (it may already have expired)."""
    membership = _membership(request)
    removed = membership.deregister(body.worker_id)
    return {"worker_id": body.worker_id, "removed": removed, "epoch": membership.epoch}


@membership_router.post("/drain")
async def drain(body: DrainRequest, request: Request) -> dict:
    """Idempotent: takes the worker off the ring at once; it stays registered while draining."""
    membership = _membership(request)
    try:
        membership.drain(body.worker_id)
    except UnknownWorker as exc:
        raise NotFound(str(exc)) from None
    return {"worker_id": body.worker_id, "draining": True, "epoch": membership.epoch,
            "active_workers": membership.num_active}


@router.get("/route/{seq_id}")
@router.get("/kv/route/{seq_id}", include_in_schema=False)  # the reference implementation's path
async def route(seq_id: str, request: Request, exclude: str = "") -> RouteResponse:
    """`exclude`: comma-separated ids of workers the caller could not reach. Also served at
    `/kv/route/{seq_id}` (the reference implementation's path), with the same body."""
    route_requests = _metrics(request).route_requests
    try:
        check_seq_id(seq_id)
        excluded = parse_exclude(exclude)
    except InvalidRequest:
        route_requests.labels(outcome="invalid").inc()
        raise
    try:
        found = _membership(request).route(seq_id, excluded)
    except NoWorkers as exc:
        route_requests.labels(outcome="unavailable").inc()
        raise Unavailable(str(exc), retry_after_s=1) from None
    route_requests.labels(outcome="ok").inc()
    previous = [WorkerRef(worker_id=p.worker_id, address=p.address) for p in found.previous]
    return RouteResponse(seq_id=seq_id, worker_id=found.worker_id, address=found.address,
                         epoch=found.epoch, previous=previous)


@router.get("/ring", response_model=RingState)
async def ring(request: Request, after: int = -1, seq: int = Query(0, ge=0), load_after: int | None = None,
               instance: str = "", wait_s: float = Query(0.0, ge=0, le=MAX_RING_WAIT_S)) -> Response:
    """The routing state: with `after` (a version of this `instance`), `seq` (the next ring change
    the caller lacks) and `load_after` (a load version), only what changed since, once something
    did or `wait_s` passed (a long poll; without `load_after`, load reports do not end it): routers stay in sync within milliseconds of a change
    without asking per request. Without them (or from another instance), everything."""
    membership, state = _membership(request), request.app.state
    if load_after is None:  # a caller that does not follow loads waits on membership changes only
        load_after = membership.load_version
    if instance != state.instance:
        after, seq, load_after = -1, 0, -1
    elif membership.version <= after and membership.load_version <= load_after and wait_s > 0:
        await state.watch.wait(wait_s)
    uptime_s = membership.now() - state.started_at
    body = membership.state(after, seq, load_after) | {
        "instance": state.instance, "settling": membership.settling(uptime_s)}
    records = len(body["workers"]) + len(body["loads"]) + sum(len(c["toggles"]) for c in body["changes"])
    # Serialised once here: a returned model would be validated again by FastAPI (the full state
    # of a thousand workers twice per answer).
    content = await serialised(lambda: RingState.model_validate(body).model_dump_json(), records)
    return Response(content, media_type="application/json")


@router.get("/workers", response_model=dict[str, dict])
async def workers(request: Request) -> Response:
    """The registered workers as a map `{worker_id: {...}}` (the reference implementation's
    shape); the membership epoch is in /stats and /ring."""
    membership = _membership(request)
    now = membership.now()
    listing = {w.worker_id: {"worker_id": w.worker_id, "address": w.address, "model_name": w.model_name,
                             "served_model_names": list(w.served_model_names), "state": w.state,
                             "age_s": round(now - w.registered_at, 3),
                             "last_heartbeat_age_s": round(now - w.last_heartbeat, 3), "load": w.load}
               for w in membership.workers()}
    # Plain JSON types already: FastAPI's encoder would walk them again (9 ms at 1000 workers).
    return Response(await serialised(lambda: json.dumps(listing), len(listing)), media_type="application/json")


@router.get("/stats")
async def stats(request: Request) -> dict:
    membership = _membership(request)
    ring = membership.ring
    # O(points), 0.1 s at 1000 workers: off the loop, on a copy (the arrays are shared, not copied)
    share = await asyncio.to_thread(ring.copy().shares)
    return {"epoch": membership.epoch, "num_workers": len(membership),
            "num_draining": membership.num_draining, "ring_points": len(ring),
            "vnodes": ring.vnodes, "share": share}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return metrics_response(_metrics(request).registry)
