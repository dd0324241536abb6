"""The README's configuration table names every setting of every service, and its metrics tables
every metric of every service, and nothing else."""

import re
from pathlib import Path

from services.coordinator.metrics import CoordinatorMetrics
from services.coordinator.settings import CoordinatorSettings
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings
import torch

from services.worker.kv.lower import LowerTiers
from services.worker.kv.store import KVLayout
from services.worker.kv.tiers import HostTier
from services.worker.metrics import COUNTERS, GAUGES, WorkerMetrics
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
    documented = set(re.findall(r"`((?:GATEWAY|COORDINATOR|WORKER)_[A-Z0-9_]+)`", table))
    assert documented == env_names()


def exported_metrics() -> set[str]:
    """Every metric family of the three services, as a query names it (counters with `_total`);
    the worker's engine metrics as exported once the model is loaded."""
    layout = KVLayout(1, 1, 2, torch.float32, torch.device("cpu"), 8)
    tiers = LowerTiers(layout, {}, HostTier(1024, pin=False), None, None)
    engine_stats = dict.fromkeys([*GAUGES, *COUNTERS], 0) | {"kv_bytes_limit": 1, "kv_tiers": tiers.stats()}
    registries = (GatewayMetrics().registry, CoordinatorMetrics().registry,
                  WorkerMetrics(lambda: engine_stats).registry)
    return {f.name + ("_total" if f.type == "counter" else "") for r in registries for f in r.collect()}


def test_metrics_tables_list_every_metric():
    text = README.read_text()
    section = text[text.index("## Metrics"):text.index("## Configuration")]
    documented = set(re.findall(r"^\| `(kvcache_[a-z0-9_]+)` \|", section, flags=re.MULTILINE))
    assert documented == exported_metrics()


def test_the_v1_section_lists_every_accepted_no_op():
    from services.gateway.openai_schemas import NO_OP_PARAMETERS

    text = README.read_text()
    section = text[text.index("### OpenAI-compatible API (`/v1`)"):text.index("### Routing and bounded loads")]
    listed = {name for line in section.splitlines() if "accepted no-ops" in line
              for name in re.findall(r"`([a-z_]+)`", line.split("|")[1])}
    assert listed == set(NO_OP_PARAMETERS)
