"""Run the whole system as local processes on loopback (no Docker): a coordinator, N workers
and a gateway. Used by scripts/local_dev.sh, the end-to-end tests and the benchmark.

    python -m services.localcluster --workers 2
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


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
    worker_ports: list[int] = field(default_factory=list)
    worker_env: dict[str, str] = field(default_factory=dict)
    start_gateway: bool = True
    start_coordinator: bool = True
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _envs: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        self.coordinator_port = self.coordinator_port or free_port()
        self.gateway_port = self.gateway_port or free_port()
        self.worker_ports = self.worker_ports or [free_port() for _ in range(self.num_workers)]

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def coordinator_url(self) -> str:
        return f"http://127.0.0.1:{self.coordinator_port}"

    @property
    def worker_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.worker_ports]

    def start(self, timeout_s: float = 180.0) -> "LocalCluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.start_coordinator:
                self._spawn("coordinator", {"COORDINATOR_PORT": str(self.coordinator_port),
                                            "COORDINATOR_TTL_S": "6"})
            for i, port in enumerate(self.worker_ports):
                self._spawn(f"worker-{i}", {
                    "WORKER_PORT": str(port), "WORKER_ID": f"worker-{i}",
                    "WORKER_COORDINATOR_URL": self.coordinator_url,
                    "WORKER_HEARTBEAT_INTERVAL_S": "1",
                    "WORKER_REGISTER_WITH_COORDINATOR": str(self.start_coordinator).lower(),
                    **self.worker_env})
            if self.start_gateway:
                self._spawn("gateway", {"GATEWAY_PORT": str(self.gateway_port),
                                        "GATEWAY_COORDINATOR_URL": self.coordinator_url})
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash: no graceful deregistration)."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self, name: str) -> None:
        self.kill(name)
        self._spawn(name, self._envs[name])

    def _spawn(self, name: str, env: dict[str, str]) -> None:
        self._envs[name] = env
        module = name.split("-")[0]
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{module}"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)

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
            if len(workers) == len(self.worker_ports):
                return
            time.sleep(0.2)
        raise TimeoutError("workers did not register with the coordinator")

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
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
        worker_ports=[args.first_worker_port + i for i in range(args.workers)])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    print(f"starting {args.workers} workers (the first run builds the tiny-gpt2 preset)...", flush=True)
    with cluster:
        print(f"gateway:     {cluster.gateway_url}\ncoordinator: {cluster.coordinator_url}")
        for url in cluster.worker_urls:
            print(f"worker:      {url}")
        print(f"logs:        {args.log_dir}/\nready. Ctrl-C stops everything.", flush=True)
        try:
            while True:
                cluster._check_alive()
                time.sleep(1)
        except (KeyboardInterrupt, SystemExit):
            print("\nstopping...", flush=True)


if __name__ == "__main__":
    main()
