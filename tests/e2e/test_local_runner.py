"""The local runner (`python -m services.localcluster`, what scripts/local_dev.sh runs) restarts a
crashed worker with the same id and port, like a StatefulSet, while the rest keeps serving."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from services.localcluster import free_port
from services.worker.model.presets import resolve_model_path
from tests.support import assert_well_formed, generate

pytestmark = pytest.mark.e2e


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_runner_restarts_a_killed_worker_and_keeps_serving(tmp_path):
    models = tmp_path / "models"
    resolve_model_path("tiny-gpt2", models)
    gateway, coordinator, first_worker = free_port(), free_port(), free_port()
    env = {**os.environ, "WORKER_MODEL_CACHE_DIR": str(models), "WORKER_MODEL_NAME": "tiny-gpt2"}
    runner = subprocess.Popen(
        [sys.executable, "-m", "services.localcluster", "--workers", "2", "--gateway-port", str(gateway),
         "--coordinator-port", str(coordinator), "--first-worker-port", str(first_worker),
         "--log-dir", str(tmp_path / "logs")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    url, state_file = f"http://127.0.0.1:{gateway}", tmp_path / "logs" / "cluster.json"
    try:
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200
                   and len(httpx.get(f"http://127.0.0.1:{coordinator}/workers").json()["workers"]) == 2,
                   120, "the cluster")
        old_pid = json.loads(state_file.read_text())["pids"]["worker-0"]
        os.kill(old_pid, signal.SIGKILL)
        for i in range(5):  # the other worker (and, after the TTL, the ring) keeps serving
            gen = generate(url, prompt=f"while down {i}", max_tokens=2)
            assert gen.status == 200, gen.events
            assert_well_formed(gen)
        new_pid = wait_until(lambda: (p := json.loads(state_file.read_text())["pids"]["worker-0"]) != old_pid
                             and p, 30, "the restart")
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{first_worker}/ready").status_code == 200, 60,
                   "the restarted worker")
        assert new_pid != old_pid
        assert_well_formed(generate(url, prompt="after", max_tokens=2))
    finally:
        runner.send_signal(signal.SIGTERM)
        output = runner.communicate(timeout=60)[0]
    assert "worker-0 restarted" in output, output
    for port in (gateway, coordinator, first_worker):
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
