"""Thin HTTP routes over Membership; domain errors become the shared JSON error responses."""

from fastapi import APIRouter, Request, Response

from services.common.errors import InvalidRequest, NotFound, Unavailable
from services.common.metrics import metrics_response
from services.common.schemas import (DeregisterRequest, HeartbeatRequest, RegisterRequest,
                                     RouteResponse, check_seq_id)
from services.coordinator.membership import Membership, NoWorkers, UnknownWorker
from services.coordinator.metrics import CoordinatorMetrics

router = APIRouter()


def _membership(request: Request) -> Membership:
    return request.app.state.membership


def _metrics(request: Request) -> CoordinatorMetrics:
    return request.app.state.metrics


@router.post("/register")
async def register(body: RegisterRequest, request: Request) -> dict:
    membership = _membership(request)
    info = membership.register(body.worker_id, body.address, body.model_name)
    return {"worker_id": info.worker_id, "address": info.address, "model_name": info.model_name,
            "epoch": membership.epoch, "ttl_s": membership.ttl_s}


@router.post("/heartbeat")
async def heartbeat(body: HeartbeatRequest, request: Request) -> dict:
    membership = _membership(request)
    try:
        membership.heartbeat(body.worker_id)
    except UnknownWorker as exc:
        _metrics(request).heartbeats.labels(outcome="unknown").inc()
        raise NotFound(f"{exc}; register again") from None
    _metrics(request).heartbeats.labels(outcome="ok").inc()
    return {"worker_id": body.worker_id, "epoch": membership.epoch}


@router.post("/deregister")
async def deregister(body: DeregisterRequest, request: Request) -> dict:
    """Idempotent: an unknown worker gets 200 with removed=false (it may already have expired)."""
    membership = _membership(request)
    removed = membership.deregister(body.worker_id)
    return {"worker_id": body.worker_id, "removed": removed, "epoch": membership.epoch}


@router.get("/route/{seq_id}")
async def route(seq_id: str, request: Request) -> RouteResponse:
    route_requests = _metrics(request).route_requests
    try:
        check_seq_id(seq_id)
    except InvalidRequest:
        route_requests.labels(outcome="invalid").inc()
        raise
    try:
        worker_id, address, epoch = _membership(request).route(seq_id)
    except NoWorkers as exc:
        route_requests.labels(outcome="unavailable").inc()
        raise Unavailable(str(exc), retry_after_s=1) from None
    route_requests.labels(outcome="ok").inc()
    return RouteResponse(seq_id=seq_id, worker_id=worker_id, address=address, epoch=epoch)


@router.get("/workers")
async def workers(request: Request) -> dict:
    membership = _membership(request)
    now = membership.now()
    return {"epoch": membership.epoch, "workers": [
        {"worker_id": w.worker_id, "address": w.address, "model_name": w.model_name,
         "age_s": round(now - w.registered_at, 3),
         "last_heartbeat_age_s": round(now - w.last_heartbeat, 3)}
        for w in membership.workers()]}


@router.get("/stats")
async def stats(request: Request) -> dict:
    membership = _membership(request)
    ring = membership.ring
    return {"epoch": membership.epoch, "num_workers": len(membership), "ring_points": len(ring),
            "vnodes": ring.vnodes, "share": ring.shares()}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return metrics_response(_metrics(request).registry)
