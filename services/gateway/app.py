"""The public gateway: stateless; routes each request to its sequence's owner worker."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

from services.common.auth import bearer_headers
from services.common.body_limit import BodyLimit
from services.common.errors import ServiceError, error_response, install_error_handlers
from services.common.loop_stall import LoopStallMonitor
from services.common.memory import freeze_startup_objects
from services.gateway.api import router
from services.gateway.api_keys import ApiKeyMiddleware, load_api_keys
from services.gateway.fast_generate import FastGenerate
from services.gateway.kv_tensor_api import router as kv_tensor_router
from services.gateway.openai_api import router as openai_router
from services.gateway.openai_format import is_openai_path, openai_error_body, openai_status
from services.gateway.metrics import GatewayMetrics, RequestMetricsMiddleware
from services.gateway.placement import Placer
from services.gateway.request_id import RequestIdMiddleware
from services.gateway.proxy import GatewayProxy
from services.gateway.ring_sync import RingSync
from services.gateway.routing import CoordinatorClient
from services.gateway.settings import GatewaySettings
from services.gateway.tenants import load_tenants
from services.gateway.upstream import UpstreamClient
from services.gateway.vllm_api import router as vllm_router

DESCRIPTION = ("Routes each request to the worker that holds its KV cache. `/generate` continues a "
               "server-side conversation (`seq_id`); `/v1/*` is OpenAI-compatible and stateless, with "
               "automatic prefix caching. With GATEWAY_API_KEYS set, every route but /health and "
               "/metrics needs `Authorization: Bearer <key>`.")


# FastAPI's native OpenTelemetry looks up the global tracer, meter and logger providers on every
# request (about 5 us); the gateway sets up none (its metrics are Prometheus, /metrics).
NO_OPENTELEMETRY = {"tracing": False, "metrics": False, "logs": False}


def render_error(request: Request, exc: ServiceError) -> Response:
    """/v1 errors in OpenAI's shape (a bad body is a 400); the gateway's own routes in ours."""
    if is_openai_path(request.url.path):
        return JSONResponse(openai_error_body(exc), status_code=openai_status(exc), headers=exc.response_headers())
    return error_response(exc)


def upstream_client(settings: GatewaySettings) -> UpstreamClient:
    return UpstreamClient(max_connections_per_peer=settings.max_worker_connections,
                          connection_wait_s=settings.connection_wait_s, connect_timeout_s=settings.connect_timeout_s,
                          read_timeout_s=settings.read_timeout_s, keepalive_expiry_s=settings.keepalive_expiry_s,
                          tcp_keepalive_s=settings.tcp_keepalive_s, headers=bearer_headers(settings.internal_token))


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = upstream_client(settings)
        placer = Placer(settings.routing, settings.load_factor)
        ring = RingSync(CoordinatorClient(client, settings.coordinator_url), placer.loads)
        app.state.proxy = GatewayProxy(client, ring, placer, metrics, migration_limit=settings.migration_limit)
        tasks = [asyncio.create_task(ring.run())]
        await ring.wait_first()
        freeze_startup_objects()  # full collections walk only what serving makes
        # Stalls are measured from here: the startup collection above delays no request.
        stalls = LoopStallMonitor(metrics.loop_stall, metrics.loop_busy_stall, settings.loop_stall_log_ms / 1000)
        tasks.append(asyncio.create_task(stalls.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            await client.close()

    app = FastAPI(title="kvcache gateway", version=version("kvcache"), description=DESCRIPTION,
                  lifespan=lifespan, redoc_url=None, telemetry=NO_OPENTELEMETRY)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app, render_error)
    app.add_middleware(FastGenerate)  # innermost: behind the key check and the request count
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       render=render_error)
    app.add_middleware(ApiKeyMiddleware, keys=load_api_keys(settings.api_keys.get_secret_value()),
                       tenants=load_tenants(settings.tenants_file))
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # counts the 401s too
    app.add_middleware(RequestIdMiddleware, render=render_error)  # outermost: every response has one
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(kv_tensor_router)
    app.include_router(vllm_router)
    return app
