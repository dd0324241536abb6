"""The public gateway: stateless; routes each request to its sequence's owner worker."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from services.common.errors import install_error_handlers
from services.common.http import make_client
from services.gateway.api import router
from services.gateway.metrics import GatewayMetrics, RequestMetricsMiddleware
from services.gateway.proxy import GatewayProxy
from services.gateway.routing import CoordinatorClient
from services.gateway.settings import GatewaySettings


def create_app(settings: GatewaySettings, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """`transport` routes the shared client to in-process fakes in tests."""
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(connect_timeout_s=settings.connect_timeout_s,
                             read_timeout_s=settings.read_timeout_s, transport=transport)
        app.state.client = client
        app.state.proxy = GatewayProxy(client, CoordinatorClient(client, settings.coordinator_url), metrics,
                                       migration_limit=settings.migration_limit)
        try:
            yield
        finally:
            await client.aclose()

    # Public service: no interactive docs or schema endpoints.
    app = FastAPI(title="kvcache gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    app.include_router(router)
    return app
