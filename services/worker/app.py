"""Worker app: loads the model off the event loop, runs the engine thread, keeps registered."""

import asyncio
import contextlib
import logging
import os
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI

from services.common.errors import install_error_handlers
from services.common.http import make_client
from services.worker.api import router
from services.worker.engine.engine import Engine, EngineConfig
from services.worker.kv_store import KVStore
from services.worker.metrics import WorkerMetrics
from services.worker.model.loader import LoadedModel, load_model
from services.worker.registration import Registration
from services.worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


class WorkerState:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.metrics = WorkerMetrics(lambda: self.engine.stats() if self.engine else None)


def kv_budget_bytes(settings: WorkerSettings, loaded: LoadedModel) -> int:
    if settings.kv_cache_bytes:
        return settings.kv_cache_bytes
    device = loaded.layout.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * settings.kv_cache_memory_fraction)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * settings.kv_cache_memory_fraction)


def build_engine(settings: WorkerSettings) -> Engine:
    """Blocking: loads the model. Runs in a worker thread, never on the event loop."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(settings.model_name, settings.model_cache_dir, settings.device, settings.dtype)
    store = KVStore(loaded.layout, kv_budget_bytes(settings, loaded))
    config = EngineConfig(worker_id=settings.worker_id, max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens,
                          max_waiting_requests=settings.max_waiting_requests,
                          enable_kv_reuse=settings.enable_kv_reuse)
    engine = Engine(loaded, store, config)
    engine.start()
    logger.info("engine ready: KV budget %.1f MiB (%d bytes/token)", store.budget_bytes / 2**20,
                loaded.layout.bytes_per_token)
    return engine


async def _start(state: WorkerState, registration: Registration | None) -> None:
    try:
        state.engine = await asyncio.to_thread(build_engine, state.settings)
    except Exception as exc:  # noqa: BLE001 - reported by /health and /ready
        logger.exception("model load failed")
        state.load_error = f"{type(exc).__name__}: {exc}"
        return
    if registration is not None:
        await registration.run()


def create_app(settings: WorkerSettings | None = None) -> FastAPI:
    settings = settings or WorkerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client = make_client(connect_timeout_s=2.0, read_timeout_s=5.0)
        s = settings
        registration = Registration(client, s.coordinator_url, s.worker_id, s.advertise_address,
                                    s.model_name, s.heartbeat_interval_s) \
            if s.register_with_coordinator else None
        task = asyncio.create_task(_start(app.state.worker, registration))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if registration is not None and app.state.worker.engine:
            await registration.deregister()
        await client.aclose()
        if app.state.worker.engine:
            await asyncio.to_thread(app.state.worker.engine.stop)

    app = FastAPI(title="kvcache worker", lifespan=lifespan)
    app.state.worker = WorkerState(settings)
    install_error_handlers(app)
    app.include_router(router)
    return app
