"""Run the whole system as local processes on loopback (no Docker): a coordinator, N workers
and a gateway, sharing one SQLite session store. Used by scripts/local_dev.sh, the end-to-end
tests and the benchmarks.

    python -m services.localcluster --workers 2

Like a StatefulSet, the runner restarts a process that exited without being asked to, with the
same id and port, after a backoff (1 s, doubling to 10 s while it keeps crashing). SIGHUP makes
it read the wanted number of workers from `<log dir>/../scale` and add workers or gracefully
drain the highest-numbered ones (`scripts/local_dev.sh scale N`). SIGINT or SIGTERM stops it all.
"""

import argparse
import itertools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 10.0
BACKOFF_RESET_S = 30.0  # up this long after a restart: the next crash waits FIRST_BACKOFF_S again


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


@dataclass
class LocalCluster:
    num_workers: int = 2        # at start; add_worker and drain change the membership later
    log_dir: Path = Path(".local/logs")
    gateway_port: int = 0       # 0 = pick free ports
    coordinator_port: int = 0
    first_worker_ports: list[int] = field(default_factory=list)  # default: free ports
    worker_env: dict[str, str] = field(default_factory=dict)     # wins over every default
    gateway_env: dict[str, str] = field(default_factory=dict)    # likewise, e.g. GATEWAY_API_KEYS
    start_gateway: bool = True
    start_coordinator: bool = True
    session_store_url: str = ""  # default: <log_dir>/../sessions.db, shared by every worker
    # The internal bearer token all the services share; default: $KVCACHE_INTERNAL_TOKEN, else a
    # random one per cluster.
    internal_token: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _envs: dict[str, dict[str, str]] = field(default_factory=dict)  # what start_process reuses
    _ports: dict[str, int] = field(default_factory=dict)  # member worker -> port
    _draining: set[str] = field(default_factory=set)
    _stopped: bool = False
    _lock: threading.RLock = field(default_factory=threading.RLock)  # the runner's threads

    def __post_init__(self):
        self.log_dir = Path(self.log_dir).resolve()
        self.coordinator_port = self.coordinator_port or free_port()
        self.gateway_port = self.gateway_port or free_port()
        ports = self.first_worker_ports or [free_port() for _ in range(self.num_workers)]
        self._ports = {f"worker-{i}": port for i, port in enumerate(ports)}
        self.session_store_url = self.session_store_url or os.environ.get("WORKER_SESSION_STORE_URL") \
            or f"sqlite:///{self.log_dir.parent / 'sessions.db'}"
        self.internal_token = self.internal_token or os.environ.get("KVCACHE_INTERNAL_TOKEN") \
            or secrets.token_urlsafe(24)

    @property
    def internal_headers(self) -> dict[str, str]:
        """For calling a worker directly (tests, benchmarks): what the gateway sends."""
        return {"Authorization": f"Bearer {self.internal_token}"}

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def coordinator_url(self) -> str:
        return f"http://127.0.0.1:{self.coordinator_port}"

    @property
    def worker_names(self) -> list[str]:
        """Member workers (running, or crashed and due a restart), not draining, by index."""
        with self._lock:
            return sorted((n for n in self._ports if n not in self._draining), key=worker_index)

    @property
    def worker_ports(self) -> list[int]:
        return [self._ports[n] for n in self.worker_names]

    @property
    def worker_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.worker_ports]

    def start(self, timeout_s: float = 180.0) -> "LocalCluster":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._stopped = False
        try:
            if self.start_coordinator:
                self._spawn("coordinator", {"COORDINATOR_PORT": str(self.coordinator_port),
                                            "COORDINATOR_TTL_S": "6",
                                            "COORDINATOR_INTERNAL_TOKEN": self.internal_token})
            for name in list(self._ports):
                self._spawn(name, self._worker_env(name))
            if self.start_gateway:
                self._spawn("gateway", {"GATEWAY_PORT": str(self.gateway_port),
                                        "GATEWAY_COORDINATOR_URL": self.coordinator_url,
                                        "GATEWAY_INTERNAL_TOKEN": self.internal_token, **self.gateway_env})
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _worker_env(self, name: str) -> dict[str, str]:
        env = {"WORKER_PORT": str(self._ports[name]), "WORKER_ID": name,
               "WORKER_COORDINATOR_URL": self.coordinator_url, "WORKER_HEARTBEAT_INTERVAL_S": "1",
               "WORKER_REGISTER_WITH_COORDINATOR": str(self.start_coordinator).lower(),
               "WORKER_SESSION_STORE_URL": self.session_store_url, "WORKER_INTERNAL_TOKEN": self.internal_token,
               # The KV tiers live beside the session store: this cluster's own, like its sessions
               "WORKER_KV_SHARED_URL": os.environ.get("WORKER_KV_SHARED_URL", str(self.log_dir.parent / "kv-shared")),
               "WORKER_KV_DISK_DIR": os.environ.get("WORKER_KV_DISK_DIR", str(self.log_dir.parent / "kv-disk" / name))}
        if "WORKER_TORCH_THREADS" not in os.environ:  # one process per core, not cores per process
            env["WORKER_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, len(self._ports))))
        return {**env, **self.worker_env}

    # --- membership changes (tests, benchmarks, the runner's scale command) -----------------
    def add_worker(self, timeout_s: float = 180.0) -> str:
        """Start `worker-N` (the lowest free index) on a free port; wait until it is registered."""
        with self._lock:
            name = next(f"worker-{i}" for i in itertools.count() if f"worker-{i}" not in self._ports)
            self._ports[name] = free_port()
            self._spawn(name, self._worker_env(name))
        self.wait_ready(timeout_s, [name])
        return name

    def drain(self, name: str, timeout_s: float = 60.0) -> int:
        """SIGTERM: the worker drains gracefully and exits. It is then no longer a member (no
        liveness check, not in worker_urls) until start_process(name). Returns its exit code."""
        with self._lock:
            proc = self.procs[name]
            self._draining.add(name)
            proc.send_signal(signal.SIGTERM)
            self._save_state()
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = _kill_group(proc)
        with self._lock:
            self._draining.discard(name)
            self._ports.pop(name, None)
            if self.procs.get(name) is proc:
                del self.procs[name]
            self._save_state()
        return code

    def remove_worker(self, name: str, timeout_s: float = 60.0) -> int:
        """drain, and forget its environment too: start_process(name) no longer knows it."""
        code = self.drain(name, timeout_s)
        with self._lock:
            self._envs.pop(name, None)
        return code

    def kill(self, name: str) -> None:
        """SIGKILL one process (a crash: no graceful deregistration)."""
        _kill_group(self.procs[name])

    def start_process(self, name: str) -> None:
        """Start a stopped, drained or crashed process again, with the same id, port and
        environment. Does not wait: see wait_ready."""
        with self._lock:
            if name in self._draining:
                raise RuntimeError(f"{name} is draining")
            if name.startswith("worker"):
                self._ports[name] = int(self._envs[name]["WORKER_PORT"])
            self._spawn(name, self._envs[name])

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start_process(name)

    def _spawn(self, name: str, env: dict[str, str]) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"cannot start {name}: the cluster is stopped")
            self._envs[name] = env
            module = name.split("-")[0]
            with open(self.log_dir / f"{name}.log", "a") as log:  # the child keeps its own copy
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", f"services.{module}"], stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, start_new_session=True)
            self._save_state()

    def _save_state(self) -> None:
        """<log_dir>/cluster.json (names, ports, pids, urls) for tools and tests; replaced whole,
        so a reader never sees half of it."""
        with self._lock:
            state = {"gateway": self.gateway_url, "coordinator": self.coordinator_url,
                     "session_store_url": self.session_store_url,
                     "workers": {n: {"port": p, "url": f"http://127.0.0.1:{p}"} for n, p in self._ports.items()},
                     "draining": sorted(self._draining),
                     "pids": {n: p.pid for n, p in self.procs.items()}}
            tmp = self.log_dir / "cluster.json.tmp"
            tmp.write_text(json.dumps(state, indent=2))
            os.replace(tmp, self.log_dir / "cluster.json")

    # --- readiness and liveness -------------------------------------------------------------
    def wait_ready(self, timeout_s: float = 180.0, names: Iterable[str] | None = None) -> None:
        """Until the named processes (default: all but draining ones) answer, and the workers
        among them are active members in the coordinator. Raises if one of them exits."""
        with self._lock:
            names = [n for n in self.procs if n not in self._draining] if names is None else list(names)
        deadline = time.monotonic() + timeout_s
        pending = {name: self._ready_url(name) for name in names}
        while pending:
            self._check_alive(names)
            pending = {n: u for n, u in pending.items() if not answers_200(u)}
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout_s}s: {sorted(pending)}; logs in {self.log_dir}")
            time.sleep(0.2)
        workers = {n for n in names if n.startswith("worker")}
        if self.start_coordinator and workers:
            self._wait_registered(workers, deadline)

    def _ready_url(self, name: str) -> str:
        if name.startswith("worker"):
            return f"http://127.0.0.1:{self._ports[name]}/ready"
        return f"{self.gateway_url if name == 'gateway' else self.coordinator_url}/health"

    def registered_workers(self) -> set[str]:
        """Ids of the workers the coordinator has as active members (empty if unreachable)."""
        try:
            workers = httpx.get(f"{self.coordinator_url}/workers", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return set()
        return {worker_id for worker_id, w in workers.items() if w.get("state", "active") == "active"}

    def _wait_registered(self, names: set[str], deadline: float) -> None:
        while not names <= self.registered_workers():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{sorted(names)} did not register with the coordinator")
            time.sleep(0.2)

    def _check_alive(self, names: Iterable[str]) -> None:
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_dir}/{name}.log")

    def exited(self) -> list[str]:
        """Processes that exited without being asked to (a drained worker is not one)."""
        with self._lock:
            procs = [(n, p) for n, p in self.procs.items() if n not in self._draining]
        return [name for name, proc in procs if proc.poll() is not None]

    def stop(self, timeout_s: float = 15.0) -> None:
        """Everything at once: workers get SIGINT (no drain: the whole cluster goes), the others
        SIGTERM; whatever is left after timeout_s is killed."""
        with self._lock:
            self._stopped = True
            procs = list(self.procs.items())
        for name, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if name.startswith("worker") else signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for _, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
        with self._lock:
            self.procs.clear()
            if self.log_dir.is_dir():
                self._save_state()

    def __enter__(self) -> "LocalCluster":
        return self if self.procs else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def answers_200(url: str) -> bool:
    """GET `url` answers 200 within a second (a service's /health or /ready)."""
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _kill_group(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.wait()


class Supervisor:
    """The runner's loop: restart crashed processes with backoff; scale on request (SIGHUP) in a
    background thread, so that supervision goes on while workers start or drain."""

    def __init__(self, cluster: LocalCluster, scale_file: Path):
        self.cluster = cluster
        self.scale_file = scale_file
        self.scale_requested = threading.Event()
        self.stop_requested = False
        self._backoff_s: dict[str, float] = {}
        self._due: dict[str, float] = {}           # name -> when to start it again
        self._restarted_at: dict[str, float] = {}
        self._scaler: threading.Thread | None = None

    def run(self, interval_s: float = 0.5) -> None:
        """Until SIGINT or SIGTERM (handled here: a flag, so a step is never cut in half)."""
        def request_stop(*_) -> None:
            self.stop_requested = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        while not self.stop_requested:
            self.step()
            time.sleep(interval_s)

    def step(self) -> None:
        self._restart_exited(time.monotonic())
        if self.scale_requested.is_set() and not (self._scaler and self._scaler.is_alive()):
            self.scale_requested.clear()
            self._scaler = threading.Thread(target=self._scale, name="scaler", daemon=True)
            self._scaler.start()

    def _restart_exited(self, now: float) -> None:
        exited = set(self.cluster.exited())
        for name in set(self._due) - exited:  # drained or removed meanwhile
            del self._due[name]
        for name in sorted(exited):
            if name not in self._due:
                self._backoff_s[name] = min(self._backoff_s.get(name, FIRST_BACKOFF_S / 2) * 2, MAX_BACKOFF_S)
                self._due[name] = now + self._backoff_s[name]
                code = getattr(self.cluster.procs.get(name), "returncode", None)
                print(f"{name} exited with {code}; restarting in {self._backoff_s[name]:.0f} s", flush=True)
            elif now >= self._due[name]:
                del self._due[name]
                self._start_again(name, now)
        for name in [n for n, at in self._restarted_at.items() if now - at > BACKOFF_RESET_S]:
            if name not in exited:
                del self._restarted_at[name]
                self._backoff_s.pop(name, None)

    def _start_again(self, name: str, now: float) -> None:
        try:
            self.cluster.start_process(name)
        except RuntimeError as exc:  # drained or stopped in the meantime
            print(f"{name} not restarted: {exc}", flush=True)
            return
        self._restarted_at[name] = now
        print(f"{name} restarted (pid {self.cluster.procs[name].pid})", flush=True)

    def _scale(self) -> None:
        try:
            wanted = int(self.scale_file.read_text().strip())
        except (OSError, ValueError) as exc:
            print(f"scale: cannot read a number of workers from {self.scale_file}: {exc}", flush=True)
            return
        if wanted < 1:
            print(f"scale: {wanted} workers asked for; at least 1 is kept", flush=True)
            wanted = 1
        workers = self.cluster.worker_names
        print(f"scale: {len(workers)} -> {wanted} workers", flush=True)
        for _ in range(wanted - len(workers)):
            try:
                name = self.cluster.add_worker()
            except (RuntimeError, TimeoutError) as exc:  # a crashed new worker is restarted
                print(f"scale: a new worker is not ready: {exc}", flush=True)
                continue
            print(f"scale: {name} added at http://127.0.0.1:{self.cluster._ports[name]}", flush=True)
        drains = [threading.Thread(target=self._drain, args=(n,), daemon=True) for n in workers[wanted:]]
        for thread in drains:
            thread.start()
        for thread in drains:
            thread.join()

    def _drain(self, name: str) -> None:
        print(f"scale: draining {name}", flush=True)
        code = self.cluster.drain(name)
        print(f"scale: {name} drained and exited ({code})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gateway-port", type=int, default=8080)
    parser.add_argument("--coordinator-port", type=int, default=8081)
    parser.add_argument("--first-worker-port", type=int, default=8082)
    parser.add_argument("--log-dir", type=Path, default=Path(".local/logs"),
                        help="logs and cluster.json; the scale file and sessions.db go in its parent")
    args = parser.parse_args()
    cluster = LocalCluster(
        num_workers=args.workers, log_dir=args.log_dir, gateway_port=args.gateway_port,
        coordinator_port=args.coordinator_port,
        first_worker_ports=[args.first_worker_port + i for i in range(args.workers)])
    supervisor = Supervisor(cluster, cluster.log_dir.parent / "scale")
    cluster.log_dir.mkdir(parents=True, exist_ok=True)
    supervisor.scale_file.write_text(f"{args.workers}\n")  # a stale count from an earlier run means nothing
    signal.signal(signal.SIGHUP, lambda *_: supervisor.scale_requested.set())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # while starting: stop at once
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    print(f"starting {args.workers} workers (the first run builds the tiny-gpt2 preset)...", flush=True)
    try:
        with cluster:
            _print_endpoints(cluster)
            supervisor.run()
            print("\nstopping...", flush=True)
    except KeyboardInterrupt:
        print("\nstopped while starting", flush=True)


def _print_endpoints(cluster: LocalCluster) -> None:
    print(f"gateway:     {cluster.gateway_url}\ncoordinator: {cluster.coordinator_url}")
    for url in cluster.worker_urls:
        print(f"worker:      {url}")
    print(f"sessions:    {cluster.session_store_url}")
    print(f"logs:        {cluster.log_dir}/ (cluster.json: names, ports, pids)\n"
          "ready. Ctrl-C stops everything.", flush=True)


if __name__ == "__main__":
    main()
