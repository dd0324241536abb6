"""The README's configuration table names every setting of every service, and nothing else."""

import re
from pathlib import Path

from services.coordinator.settings import CoordinatorSettings
from services.gateway.settings import GatewaySettings
from services.worker.settings import WorkerSettings

README = Path(__file__).resolve().parents[2] / "README.md"


def env_names() -> set[str]:
    names = set()
    for cls, prefix in ((GatewaySettings, "GATEWAY_"), (CoordinatorSettings, "COORDINATOR_"),
                        (WorkerSettings, "WORKER_")):
        for field in cls.model_fields:
            names.add("WORKER_ID" if field == "worker_id" else prefix + field.upper())
    return names


def test_configuration_table_matches_settings():
    text = README.read_text()
    table = text[text.index("## Configuration"):text.index("## Tests")]
    documented = set(re.findall(r"`((?:GATEWAY|COORDINATOR|WORKER)_[A-Z_]+)`", table))
    assert documented == env_names()
