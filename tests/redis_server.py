"""A real redis-server on a loopback port, started and stopped by the tests (Debian's
`redis-server`). Without `data_dir` it keeps nothing on disk; with one, it keeps its data in an
append-only file there, so stop() then start() (same port) brings the sessions back."""

import shutil
import subprocess
import time
from pathlib import Path

import redis

from services.localcluster import free_port


def redis_server_path() -> str | None:
    return shutil.which("redis-server")


class RedisServer:
    def __init__(self, data_dir: Path | None = None, port: int = 0):
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        self.proc = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        with redis.Redis.from_url(self.url, socket_connect_timeout=0.5) as client:
            while True:
                try:
                    client.ping()
                    return self
                except redis.RedisError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        self.stop()
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)

    def _command(self) -> list[str]:
        command = [redis_server_path(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--daemonize", "no"]
        if self.data_dir is None:
            return command + ["--appendonly", "no"]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return command + ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.data_dir)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash; what the append-only file had written survives (fsync always)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
