"""Run the whole system as local processes on loopback (no Docker): a coordinator, N workers
and a gateway, sharing one SQLite session store. Used by scripts/local_dev.sh, the end-to-end
tests and the benchmark.

    python -m services.localcluster --workers 2

Like a StatefulSet, the runner restarts a process that crashed, with the same id and port, after
a short backoff. SIGHUP makes it read the wanted number of workers from `<log dir>/../scale`
and add workers or drain the highest-numbered ones (`scripts/local_dev.sh scale N`).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MAX_BACKOFF_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    num_workers: int = 2
    log_dir: Path = Path(".local/logs")
    gateway_port: int = 0       # 0 = pick free ports
    coordinator_port: int = 0
    first_worker_ports: list[int] = field(default_factory=list)  # default: free ports
    worker_env: dict[str, str] = field(default_factory=dict)
    start_gateway: bool = True
    start_coordinator: bool = True
    session_store_url: str = ""  # default: <log_dir>/../sessions.db, shared by every worker
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _envs: dict[str, dict[str, str]] = field(default_factory=dict)
    _ports: dict[str, int] = field(default_factory=dict)  # worker name -> port, in start order

    def __post_init__(self):
        self.log_dir = Path(self.log_dir).resolve()
        self.coordinator_port = self.coordinator_port or free_port()
        self.gateway_port = self.gateway_port or free_port()
        ports = self.first_worker_ports or [free_port() for _ in range(self.num_workers)]
        self._ports = {f"worker-{i}": port for i, port in enumerate(ports)}
        self.session_store_url = self.session_store_url or os.environ.get("WORKER_SESSION_STORE_URL") \
            or f"sqlite:///{self.log_dir.parent / 'sessions.db'}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def coordinator_url(self) -> str:
        return f"http://127.0.0.1:{self.coordinator_port}"

    @property
    def worker_ports(self) -> list[int]:
        return list(self._ports.values())

    @property
    def worker_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.worker_ports]

    def start(self, timeout_s: float = 180.0) -> "LocalCluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.start_coordinator:
                self._spawn("coordinator", {"COORDINATOR_PORT": str(self.coordinator_port),
                                            "COORDINATOR_TTL_S": "6"})
            for name in self._ports:
                self._spawn(name, self._worker_env(name))
            if self.start_gateway:
                self._spawn("gateway", {"GATEWAY_PORT": str(self.gateway_port),
                                        "GATEWAY_COORDINATOR_URL": self.coordinator_url})
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_env(self, name: str) -> dict[str, str]:
        env = {"WORKER_PORT": str(self._ports[name]), "WORKER_ID": name,
               "WORKER_COORDINATOR_URL": self.coordinator_url, "WORKER_HEARTBEAT_INTERVAL_S": "1",
               "WORKER_REGISTER_WITH_COORDINATOR": str(self.start_coordinator).lower(),
               "WORKER_SESSION_STORE_URL": self.session_store_url}
        if "WORKER_TORCH_THREADS" not in os.environ:  # one process per core, not cores per process
            env["WORKER_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, len(self._ports))))
        return {**env, **self.worker_env}

    # --- membership changes (tests, the runner's scale command) -----------------------------
    def add_worker(self, timeout_s: float = 180.0) -> str:
        index = next(i for i in range(len(self._ports) + 1) if f"worker-{i}" not in self._ports)
        name = f"worker-{index}"
        self._ports[name] = free_port()
        self._spawn(name, self._worker_env(name))
        self.wait_ready(timeout_s)
        return name

    def drain(self, name: str, timeout_s: float = 60.0) -> int:
        """SIGTERM: the worker drains gracefully and exits. Returns its exit code."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        self._save_state()
        return code

    def remove_worker(self, name: str, timeout_s: float = 60.0) -> int:
        code = self.drain(name, timeout_s)
        del self._ports[name]
        self._save_state()
        return code

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash: no graceful deregistration)."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def start_process(self, name: str) -> None:
        """Start a stopped or crashed process again, with the same id, port and environment."""
        self._spawn(name, self._envs[name])

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start_process(name)

    def _spawn(self, name: str, env: dict[str, str]) -> None:
        self._envs[name] = env
        module = name.split("-")[0]
        log = open(self.log_dir / f"{name}.log", "a")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{module}"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
        self._save_state()

    def _save_state(self) -> None:
        """<log_dir>/cluster.json: names, ports and pids, for tools and tests."""
        state = {"gateway": self.gateway_url, "coordinator": self.coordinator_url,
                 "workers": {n: {"port": p, "url": f"http://127.0.0.1:{p}"} for n, p in self._ports.items()},
                 "pids": {n: p.pid for n, p in self.procs.items()}}
        (self.log_dir / "cluster.json").write_text(json.dumps(state, indent=2))

    # --- readiness and supervision ----------------------------------------------------------
    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        urls = [f"{u}/ready" for u in self.worker_urls]
        if self.start_coordinator:
            urls.append(f"{self.coordinator_url}/health")
        if self.start_gateway:
            urls.append(f"{self.gateway_url}/health")
        pending = set(urls)
        while pending:
            self._check_alive()
            pending = {u for u in pending if not _ok(u)}
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s}s: {sorted(pending)}; logs in {self.log_dir}")
            time.sleep(0.2)
        if self.start_coordinator:
            self._wait_registered(deadline)

    def _wait_registered(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            workers = httpx.get(f"{self.coordinator_url}/workers", timeout=2).json()["workers"]
            if {w["worker_id"] for w in workers if w.get("state", "active") == "active"} >= set(self._ports):
                return
            time.sleep(0.2)
        raise TimeoutError("workers did not register with the coordinator")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log")

    def exited(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def stop(self) -> None:
        """Everything at once: workers get SIGINT (no drain: the whole cluster goes)."""
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if name.startswith("worker") else signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "LocalCluster":
        return self if self.procs else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


class Supervisor:
    """The runner's loop: restart crashed processes with backoff; scale on request."""

    def __init__(self, cluster: LocalCluster, scale_file: Path):
        self.cluster = cluster
        self.scale_file = scale_file
        self.scale_requested = threading.Event()
        self._backoff: dict[str, float] = {}
        self._due: dict[str, float] = {}

    def step(self) -> None:
        now = time.monotonic()
        for name in self.cluster.exited():
            if name not in self._due:
                delay = self._backoff.get(name, 0.5) * 2
                self._backoff[name] = min(delay, MAX_BACKOFF_S)
                self._due[name] = now + self._backoff[name]
                print(f"{name} exited with {self.cluster.procs[name].returncode}; restarting in "
                      f"{self._backoff[name]:.0f} s", flush=True)
            elif now >= self._due[name]:
                del self._due[name]
                self.cluster.start_process(name)
                print(f"{name} restarted", flush=True)
        if self.scale_requested.is_set():
            self.scale_requested.clear()
            self._scale()

    def _scale(self) -> None:
        try:
            wanted = int(self.scale_file.read_text().strip())
        except (OSError, ValueError) as exc:
            print(f"scale: cannot read {self.scale_file}: {exc}", flush=True)
            return
        workers = self.cluster._ports
        while len(workers) < wanted:
            print(f"scale: added {self.cluster.add_worker()}", flush=True)
        while len(workers) > max(1, wanted):
            name = sorted(workers, key=lambda n: int(n.split("-")[1]))[-1]
            print(f"scale: draining {name}", flush=True)
            code = self.cluster.remove_worker(name)
            print(f"scale: {name} drained and exited ({code})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gateway-port", type=int, default=8080)
    parser.add_argument("--coordinator-port", type=int, default=8081)
    parser.add_argument("--first-worker-port", type=int, default=8082)
    parser.add_argument("--log-dir", type=Path, default=Path(".local/logs"))
    args = parser.parse_args()
    cluster = LocalCluster(
        num_workers=args.workers, log_dir=args.log_dir, gateway_port=args.gateway_port,
        coordinator_port=args.coordinator_port,
        first_worker_ports=[args.first_worker_port + i for i in range(args.workers)])
    supervisor = Supervisor(cluster, cluster.log_dir.parent / "scale")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGHUP, lambda *_: supervisor.scale_requested.set())
    print(f"starting {args.workers} workers (the first run builds the tiny-gpt2 preset)...", flush=True)
    with cluster:
        print(f"gateway:     {cluster.gateway_url}\ncoordinator: {cluster.coordinator_url}")
        for url in cluster.worker_urls:
            print(f"worker:      {url}")
        print(f"sessions:    {cluster.session_store_url}")
        print(f"logs:        {cluster.log_dir}/\nready. Ctrl-C stops everything.", flush=True)
        try:
            while True:
                supervisor.step()
                time.sleep(0.5)
        except (KeyboardInterrupt, SystemExit):
            print("\nstopping...", flush=True)


if __name__ == "__main__":
    main()
