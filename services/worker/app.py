"""Worker app: loads the model off the event loop, runs the engine thread, keeps registered,
keeps each sequence's history in the session store, and drains gracefully."""

import asyncio
import contextlib
import logging
import os
from contextlib import asynccontextmanager

import torch
from fastapi import Depends, FastAPI

from services.common.auth import bearer_headers, require_bearer
from services.common.body_limit import BodyLimit
from services.common.errors import Draining, NotReady, error_response, install_error_handlers
from services.common.http import make_client
from services.worker import completions_api, internal_api, kv_tensor_api, tokenize_api
from services.worker.cpu_threads import confine_to_one_thread, confined_executor
from services.worker.api import open_router, router
from services.worker.drain import Drainer
from services.worker.engine.engine import Engine, EngineConfig, EngineObserver
from services.worker.kv.handoff import KVPuller
from services.worker.kv.store import KVStore
from services.worker.kv.setup import open_lower_tiers, weights_revision
from services.worker.kv.transfer import fingerprint
from services.worker.load import InFlight, InFlightMiddleware
from services.worker.metrics import WorkerMetrics
from services.worker.model.loader import LoadedModel, load_model
from services.worker.model.model_support import UnsupportedModel
from services.worker.registration import Registration
from services.worker.session_store import SessionStore, describe_store, open_session_store
from services.worker.settings import WorkerSettings
from services.worker.turns import Turns

logger = logging.getLogger(__name__)


class WorkerState:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.metrics = WorkerMetrics(lambda: self.engine.stats() if self.engine else None)
        self.turns: Turns | None = None
        self.puller: KVPuller | None = None
        self.fingerprint: dict = {}
        self.in_flight = InFlight()
        self.drainer = Drainer(settings.drain_timeout_s, registration=None)
        self.drainer.bind(lambda: self.engine, lambda: self.turns.num_open if self.turns else 0)

    def require_engine(self) -> Engine:
        if self.engine is None:
            detail = self.load_error or "model is loading"
            raise NotReady(f"worker not ready: {detail}", retry_after_s=None if self.load_error else 2)
        return self.engine

    def require_serving(self) -> Engine:
        """The engine, if this worker takes new requests (loaded, not draining)."""
        engine = self.require_engine()
        if self.drainer.draining:
            raise Draining("worker is draining: ask the coordinator for the new owner", retry_after_s=1)
        return engine

    def start_drain(self) -> None:
        self.drainer.start_drain()


def kv_budget_bytes(settings: WorkerSettings, loaded: LoadedModel) -> int:
    if settings.kv_cache_bytes:
        return settings.kv_cache_bytes
    device = loaded.layout.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * settings.kv_cache_memory_fraction)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram * settings.kv_cache_memory_fraction)


def build_engine(settings: WorkerSettings, observer: EngineObserver | None = None) -> Engine:
    """Blocking: loads the model. Runs in a worker thread, never on the event loop."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # also lifts this thread's cap: put it back
        confine_to_one_thread()
    loaded = load_model(settings.model_name, settings.model_cache_dir, settings.device, settings.dtype)
    store = KVStore(loaded.layout, kv_budget_bytes(settings, loaded))
    fp = fingerprint(settings.model_name, loaded.layout, weights_revision(loaded.model))
    tiers = open_lower_tiers(settings, loaded.layout, fp, observer)
    config = EngineConfig(worker_id=settings.worker_id, max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens,
                          max_waiting_requests=settings.max_waiting_requests,
                          enable_kv_reuse=settings.enable_kv_reuse, tail_wait_s=settings.tail_wait_s)
    engine = Engine(loaded, store, config, observer, tiers)
    engine.fingerprint = fp
    engine.start()
    logger.info("engine ready: KV budget %.1f MiB (%d bytes/token)", store.budget_bytes / 2**20,
                loaded.layout.bytes_per_token)
    return engine


async def _start(state: WorkerState, registration: Registration | None, client) -> None:
    try:
        engine = await asyncio.to_thread(build_engine, state.settings, state.metrics)
    except UnsupportedModel as exc:  # refused, never served wrong: one line, no traceback
        logger.error("model refused: %s", exc)
        state.load_error = f"{type(exc).__name__}: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 - reported by /health and /ready
        logger.exception("model load failed")
        state.load_error = f"{type(exc).__name__}: {exc}"
        return
    s = state.settings
    state.fingerprint = engine.fingerprint
    state.puller = KVPuller(client, engine, s.worker_id, state.fingerprint, bearer_headers(s.internal_token),
                            state.metrics.handoff_duration.observe)
    state.engine = engine
    if registration is not None and not state.drainer.draining:
        registration.describe_model(s.served_model_names, engine.window)
        await registration.run()


def open_store(settings: WorkerSettings) -> SessionStore:
    store = open_session_store(settings.session_store_url, ttl_s=settings.session_ttl_s,
                               lease_s=settings.turn_lease_s)
    logger.info("session store: %s", describe_store(settings.session_store_url))
    return store


def create_app(settings: WorkerSettings | None = None) -> FastAPI:
    settings = settings or WorkerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: WorkerState = app.state.worker
        s = settings
        # asyncio.to_thread's threads run torch ops on themselves alone (services/worker/cpu_threads.py).
        asyncio.get_running_loop().set_default_executor(confined_executor())
        client = make_client(connect_timeout_s=2.0, read_timeout_s=5.0)
        store = await asyncio.to_thread(open_store, s)
        state.turns = Turns(store, s.turn_lease_s, state.metrics.observe_store_call)
        registration = Registration(client, s.coordinator_url, s.worker_id, s.advertise_address,
                                    s.model_name, s.heartbeat_interval_s, bearer_headers(s.internal_token),
                                    load=lambda: state.in_flight.count) \
            if s.register_with_coordinator else None
        state.drainer.registration = registration
        tasks = [asyncio.create_task(_start(state, registration, client)),
                 asyncio.create_task(state.turns.renew_forever()),
                 asyncio.create_task(state.turns.repair_forever())]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if registration is not None and state.engine and not state.drainer.status.drained:
            await registration.deregister()
        await client.aclose()
        if state.engine:
            await asyncio.to_thread(state.engine.stop)
        await asyncio.to_thread(store.close)

    app = FastAPI(title="kvcache worker", lifespan=lifespan)
    app.state.worker = WorkerState(settings)
    app.state.kv_tensors = kv_tensor_api.new_store(settings)
    install_error_handlers(app)
    app.add_middleware(InFlightMiddleware, in_flight=app.state.worker.in_flight)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       render=lambda _, exc: error_response(exc))
    gateway_only = [Depends(require_bearer(settings.internal_token))]
    app.include_router(open_router)
    app.include_router(router, dependencies=gateway_only)
    app.include_router(completions_api.router, dependencies=gateway_only)
    app.include_router(tokenize_api.router, dependencies=gateway_only)
    app.include_router(internal_api.router, dependencies=gateway_only)
    app.include_router(kv_tensor_api.router, dependencies=gateway_only)
    return app
