"""The chaos suite's cluster: real processes (coordinator, 2 workers, a gateway with API keys and
tenants) and a real redis-server as the session store, with an append-only file (fsync always)
so that it can be stopped, killed and started again on the same port with its data."""

import json
import os

import pytest

from tests.chaos.ledger import COUNTS, Target
from tests.conftest import require_redis_server
from tests.redis_server import RedisServer
from tests.support import start_cluster

SLOW_CLIENT_TIMEOUT_S = 2
KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789", "team-1": "key-team-one-0123456789",
        "team-2": "key-team-two-0123456789"}


@pytest.fixture(scope="package")
def redis_server(tmp_path_factory):
    require_redis_server()
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="package")
def chaos_cluster(tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("chaos")
    tenants = tmp / "tenants.json"
    tenants.write_text(json.dumps({"team": [KEYS["team-1"], KEYS["team-2"]]}))
    gateway_env = {"GATEWAY_API_KEYS": f"{KEYS['alice']},{KEYS['bob']}", "GATEWAY_TENANTS_FILE": str(tenants),
                   "GATEWAY_HEADER_TIMEOUT_S": str(SLOW_CLIENT_TIMEOUT_S),
                   "GATEWAY_BODY_TIMEOUT_S": str(SLOW_CLIENT_TIMEOUT_S)}
    cluster = start_cluster(tmp, num_workers=2, gateway_env=gateway_env,
                            WORKER_SESSION_STORE_URL=redis_server.url)
    yield cluster
    cluster.stop()


def as_user(cluster, user: str) -> Target:
    return Target(cluster.gateway_url, {"Authorization": f"Bearer {KEYS[user]}"})


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        line = ", ".join(f"{name} {count}" for name, count in COUNTS.items())
        terminalreporter.write_line(f"chaos suite: {line}")
        path = os.environ.get("KVCACHE_CHAOS_COUNTS")
        if path:
            with open(path, "w") as out:
                json.dump(dict(COUNTS), out)
