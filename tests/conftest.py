"""Fixtures shared by every suite. Keep this generic; suite-specific fixtures live in the suite."""

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.redis_server import RedisServer, redis_server_path

if TYPE_CHECKING:
    from services.worker.model.loader import LoadedModel


def require_redis_server() -> None:
    """Redis tests are mandatory in CI (.ci/run installs redis-server); elsewhere they may skip."""
    if redis_server_path() is None:
        reason = "redis-server is not on PATH (apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: Redis tests are mandatory in CI")
        print(f"skipping the Redis tests: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_url():
    """A real redis-server on a free loopback port for the whole session."""
    require_redis_server()
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="session")
def tiny_model_cache_dir(tmp_path_factory) -> Path:
    """A model cache dir (WORKER_MODEL_CACHE_DIR) holding the built `tiny-gpt2` preset."""
    from services.worker.model.presets import resolve_model_path  # torch: imported only when needed

    cache_dir = tmp_path_factory.mktemp("models")
    resolve_model_path("tiny-gpt2", cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model_cache_dir) -> "LoadedModel":
    """`tiny-gpt2` loaded on CPU in float32. Shared: do not mutate it (use dataclasses.replace)."""
    from services.worker.model.loader import load_model

    return load_model("tiny-gpt2", tiny_model_cache_dir, device="cpu", dtype="float32")
