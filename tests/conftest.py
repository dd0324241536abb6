"""Fixtures shared by every suite. Keep this generic; suite-specific fixtures live in the suite."""

from pathlib import Path

import pytest

from services.worker.model.loader import LoadedModel, load_model
from services.worker.model.presets import resolve_model_path


@pytest.fixture(scope="session")
def tiny_model_cache_dir(tmp_path_factory) -> Path:
    """A model cache dir (WORKER_MODEL_CACHE_DIR) holding the built `tiny-gpt2` preset."""
    cache_dir = tmp_path_factory.mktemp("models")
    resolve_model_path("tiny-gpt2", cache_dir)
    return cache_dir


@pytest.fixture(scope="session")
def loaded_tiny(tiny_model_cache_dir) -> LoadedModel:
    """`tiny-gpt2` loaded on CPU in float32. Shared: do not mutate it (use dataclasses.replace)."""
    return load_model("tiny-gpt2", tiny_model_cache_dir, device="cpu", dtype="float32")
