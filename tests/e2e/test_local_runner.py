"""The local runner (`python -m services.localcluster`, what scripts/local_dev.sh runs) restarts a
crashed worker with the same id and port, like a StatefulSet, while the rest keeps serving; on
SIGHUP it scales to the count in its scale file; on SIGTERM every process goes. And the
LocalCluster methods the tests and the runner use: add_worker, drain, kill, start_process."""

import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from services.localcluster import LocalCluster, free_port
from services.worker.model.presets import resolve_model_path
from tests import support
from tests.support import assert_well_formed, generate, start_cluster

pytestmark = pytest.mark.e2e


# processes come and go here: a refused connection or a half-written state file is "not yet"
wait_until = functools.partial(support.wait_until, ignoring=(httpx.HTTPError, OSError, ValueError, KeyError))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def active_workers(coordinator_url: str) -> dict[str, dict]:
    workers = httpx.get(f"{coordinator_url}/workers", timeout=2).json()
    return {worker_id: w for worker_id, w in workers.items() if w["state"] == "active"}


class Runner:
    """`python -m services.localcluster` in a subprocess, with its stdout collected."""

    def __init__(self, tmp_path: Path, num_workers: int):
        models = tmp_path / "models"
        resolve_model_path("tiny-gpt2", models)  # built once here, not in each worker
        self.gateway, self.coordinator, first_worker = free_port(), free_port(), free_port()
        self.url, self.coordinator_url = f"http://127.0.0.1:{self.gateway}", f"http://127.0.0.1:{self.coordinator}"
        self.state_file, self.scale_file = tmp_path / "logs" / "cluster.json", tmp_path / "scale"
        self.seen_pids: set[int] = set()
        env = {**os.environ, "WORKER_MODEL_CACHE_DIR": str(models), "WORKER_MODEL_NAME": "tiny-gpt2",
               "WORKER_DRAIN_TIMEOUT_S": "3"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.localcluster", "--workers", str(num_workers),
             "--gateway-port", str(self.gateway), "--coordinator-port", str(self.coordinator),
             "--first-worker-port", str(first_worker), "--log-dir", str(tmp_path / "logs")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def state(self) -> dict:
        state = json.loads(self.state_file.read_text())
        self.seen_pids.update(state["pids"].values())
        return state

    def scale(self, num_workers: int) -> None:
        self.scale_file.write_text(f"{num_workers}\n")
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """SIGTERM; then no process it ever started is left, and no port answers."""
        if self.proc.poll() is None:
            self.state()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        wait_until(lambda: not any(alive(pid) for pid in self.seen_pids), "every process to be gone", timeout_s=5)
        for port in (self.gateway, self.coordinator):
            with pytest.raises(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    runner = Runner(tmp_path_factory.mktemp("runner"), num_workers=2)
    try:
        # "ready." is printed once the runner's own start-up checks are over and it supervises:
        # a worker killed before then fails the start-up, as it should.
        wait_until(lambda: "ready. Ctrl-C" in runner.output, f"the cluster; output so far:\n{runner.output}", timeout_s=120)
        assert httpx.get(f"{runner.url}/health").status_code == 200
        assert set(active_workers(runner.coordinator_url)) == {"worker-0", "worker-1"}
        yield runner
    finally:
        runner.stop()
    assert runner.proc.returncode == 0, runner.output


def test_runner_restarts_a_killed_worker_and_keeps_serving(runner):
    state = runner.state()
    old_pid, port = state["pids"]["worker-0"], state["workers"]["worker-0"]["port"]
    os.kill(old_pid, signal.SIGKILL)
    killed_at, served = time.monotonic(), 0

    def back() -> bool:
        nonlocal served
        gen = generate(runner.url, prompt=f"while down {served}", max_tokens=2, timeout_s=30)
        assert gen.status == 200, gen.events  # the other worker (the gateway re-routes) serves
        assert_well_formed(gen)
        served += 1
        new_pid = runner.state()["pids"]["worker-0"]
        return (new_pid != old_pid and httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
                and active_workers(runner.coordinator_url)["worker-0"]["last_heartbeat_age_s"] < 2)

    wait_until(back, f"worker-0 to come back; output:\n{runner.output}", timeout_s=30)
    print(f"worker-0 back in {time.monotonic() - killed_at:.1f} s; {served} requests served meanwhile")
    assert served >= 2 and "worker-0 restarted" in runner.output
    assert runner.state()["workers"]["worker-0"]["port"] == port
    assert_well_formed(generate(runner.url, prompt="after", max_tokens=2))


def test_runner_scales_out_and_drains_on_sighup(runner):
    started = time.monotonic()
    runner.scale(3)
    wait_until(lambda: set(active_workers(runner.coordinator_url)) == {"worker-0", "worker-1", "worker-2"},
               f"a third worker; output:\n{runner.output}", timeout_s=60)
    added_pid = runner.state()["pids"]["worker-2"]
    print(f"scale 2 -> 3: {time.monotonic() - started:.1f} s")
    assert_well_formed(generate(runner.url, prompt="three", max_tokens=2))

    started = time.monotonic()
    runner.scale(2)
    wait_until(lambda: "worker-2" not in runner.state()["workers"] and not alive(added_pid),
               f"worker-2 to drain; output:\n{runner.output}", timeout_s=60)
    print(f"scale 3 -> 2: {time.monotonic() - started:.1f} s")
    assert "scale: worker-2 drained and exited (0)" in runner.output
    assert set(active_workers(runner.coordinator_url)) == {"worker-0", "worker-1"}
    assert_well_formed(generate(runner.url, prompt="two", max_tokens=2))


def test_worker_env_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("WORKER_TORCH_THREADS", raising=False)
    monkeypatch.delenv("WORKER_SESSION_STORE_URL", raising=False)
    cluster = LocalCluster(num_workers=2, log_dir=tmp_path / "logs")
    env = cluster._worker_env("worker-1")
    assert env["WORKER_SESSION_STORE_URL"] == f"sqlite:///{tmp_path.resolve()}/sessions.db"
    assert env["WORKER_TORCH_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    given = LocalCluster(log_dir=tmp_path / "logs", worker_env={"WORKER_TORCH_THREADS": "3"})
    assert given._worker_env("worker-0")["WORKER_TORCH_THREADS"] == "3"


def test_add_drain_kill_and_start_process(tmp_path):
    with start_cluster(tmp_path, num_workers=1, WORKER_DRAIN_TIMEOUT_S="3") as cluster:
        assert cluster.add_worker() == "worker-1"
        assert cluster.registered_workers() == {"worker-0", "worker-1"}
        assert len(cluster.worker_urls) == 2
        assert cluster.drain("worker-1") == 0
        assert cluster.worker_names == ["worker-0"] and "worker-1" not in cluster.procs
        assert "worker-1" not in json.loads((cluster.log_dir / "cluster.json").read_text())["workers"]

        old_pid, url = cluster.procs["worker-0"].pid, cluster.worker_urls[0]
        cluster.kill("worker-0")
        assert cluster.exited() == ["worker-0"]
        cluster.start_process("worker-0")
        cluster.wait_ready(60)
        assert cluster.procs["worker-0"].pid != old_pid and cluster.worker_urls == [url]
        assert_well_formed(generate(cluster.gateway_url, prompt="again", max_tokens=2))
    assert (tmp_path / "sessions.db").exists()
