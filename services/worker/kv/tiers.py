"""The storage of each tier below device memory. No torch math here: tensors or bytes in, out.

- HostTier: chunk tensors in host memory (pinned when the device is CUDA), byte budget, S3-FIFO.
- DiskTier: one safetensors file per chunk in a local directory (an emptyDir or a local SSD in
  Kubernetes), byte budget, S3-FIFO; its index is rebuilt from the directory at start, so a
  restarted worker keeps what it had written.
- Shared stores, read by every worker: a directory or object store through fsspec (`file://`,
  `gs://`, ...) or Redis (`redis://`). Entries expire after a TTL; the byte budget is Redis's own
  `maxmemory` (an LRU policy), or for fsspec a sweep of the oldest entries.

Every method is thread-safe: the engine thread, the tier writer and request threads share them.
"""

import logging
import os
import threading
import time
from pathlib import Path

from services.worker.kv.policy import S3FIFO

logger = logging.getLogger(__name__)

SUFFIX = ".kv.safetensors"


class HostTier:
    """Holds `Chunk`s (services/worker/kv/lower.py): ids and a CPU tensor."""

    name = "host"

    def __init__(self, budget_bytes: int, pin: bool):
        self.budget_bytes = budget_bytes
        self.pin = pin
        self._chunks: dict = {}
        self._policy = S3FIFO(budget_bytes)
        self._lock = threading.Lock()

    def __contains__(self, key: str) -> bool:
        return key in self._chunks

    def get(self, key: str):
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._policy.touch(key)
            return chunk

    def put(self, key: str, chunk) -> list:
        """Keep a chunk; returns the chunks evicted for it, for the tier below (possibly this
        one, if it is larger than the budget)."""
        if self.pin and not chunk.data.is_pinned():
            chunk.data = chunk.data.pin_memory()
        with self._lock:
            if key in self._chunks:
                return []
            evicted = self._policy.insert(key, chunk.nbytes)
            self._chunks[key] = chunk
            return [self._chunks.pop(k) for k in evicted]

    def remove(self, key: str) -> None:
        with self._lock:
            self._policy.remove(key)
            self._chunks.pop(key, None)

    def stats(self) -> dict:
        return {"entries": len(self._chunks), "bytes": self._policy.used_bytes, "budget_bytes": self.budget_bytes}


class DiskTier:
    name = "disk"

    def __init__(self, directory: Path, budget_bytes: int):
        self.directory = directory
        self.budget_bytes = budget_bytes
        self._policy = S3FIFO(budget_bytes)
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        files = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            for key in self._policy.insert(path.name[:-len(SUFFIX)], path.stat().st_size):
                self._path(key).unlink(missing_ok=True)
        for tmp in self.directory.glob("*.tmp"):  # a write cut short by a crash
            tmp.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def __contains__(self, key: str) -> bool:
        return key in self._policy

    def get(self, key: str) -> bytes | None:
        with self._lock:
            if key not in self._policy:
                return None
            self._policy.touch(key)
        try:
            return self._path(key).read_bytes()
        except OSError:
            self.remove(key)
            return None

    def put(self, key: str, raw: bytes) -> None:
        with self._lock:
            if key in self._policy:
                return
            evicted = self._policy.insert(key, len(raw))
        for old in evicted:
            self._path(old).unlink(missing_ok=True)
        if key in evicted:
            return
        tmp = self.directory / f"{key}.{threading.get_ident()}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, self._path(key))  # readers never see half a file

    def remove(self, key: str) -> None:
        with self._lock:
            self._policy.remove(key)
        self._path(key).unlink(missing_ok=True)

    def stats(self) -> dict:
        return {"entries": len(self._policy), "bytes": self._policy.used_bytes, "budget_bytes": self.budget_bytes}


class FsspecStore:
    """A shared directory or bucket: one object per chunk. Expiry and the byte budget are a sweep
    (oldest first), run at most every `sweep_interval_s` by whichever worker writes; on GCS, a
    bucket lifecycle rule (infra/) also deletes objects older than the TTL."""

    name = "shared"

    def __init__(self, url: str, ttl_s: float, budget_bytes: int, sweep_interval_s: float = 60.0):
        import fsspec  # only workers with an fsspec shared tier need it

        # No listings cache: other workers write and delete entries all the time (gcsfs would
        # otherwise answer `exists` from a stale listing)
        self.fs, self.root = fsspec.core.url_to_fs(url, use_listings_cache=False)
        self.fs.makedirs(self.root, exist_ok=True)
        # On this host's own disk: the disk tier need not copy what it holds (the same medium)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.ttl_s = ttl_s
        self.budget_bytes = budget_bytes
        self.sweep_interval_s = sweep_interval_s
        self._last_sweep = 0.0
        self._lock = threading.Lock()

    def _path(self, key: str) -> str:
        return f"{self.root.rstrip('/')}/{key}{SUFFIX}"

    def contains(self, keys: list[str]) -> list[bool]:
        return [self.fs.exists(self._path(k)) for k in keys]

    def get(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(key))
        except (FileNotFoundError, OSError):
            return None

    def put(self, key: str, raw: bytes) -> None:
        path = self._path(key)
        if self.local:  # a reader must never see half a file: write aside, then rename (atomic)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            self.fs.pipe_file(tmp, raw)
            self.fs.mv(tmp, path)
        else:  # an object upload is all-or-nothing already (a move would cost a copy and a delete)
            self.fs.pipe_file(path, raw)
        self._maybe_sweep()

    def remove(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except (FileNotFoundError, OSError):
            pass

    def _maybe_sweep(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last_sweep < self.sweep_interval_s:
                return
            self._last_sweep = now
        self.sweep()

    def sweep(self) -> int:
        """Deletes expired entries, then the oldest while over budget; returns how many."""
        try:
            listing = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:  # an object store's prefix with no objects does not exist
            return 0
        entries = [e for e in listing if e["name"].endswith(SUFFIX)]
        entries.sort(key=_mtime)
        total, cutoff, removed = sum(e["size"] for e in entries), time.time() - self.ttl_s, 0
        for entry in entries:
            if _mtime(entry) >= cutoff and total <= self.budget_bytes:
                break
            try:
                self.fs.rm_file(entry["name"])
            except (FileNotFoundError, OSError):
                continue
            total -= entry["size"]
            removed += 1
        return removed

    def stats(self) -> dict:
        return {"url_scheme": self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0],
                "budget_bytes": self.budget_bytes, "ttl_s": self.ttl_s}


def _mtime(entry: dict) -> float:
    value = entry.get("mtime") or entry.get("updated") or entry.get("LastModified") or 0
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


class RedisStore:
    """Chunks as Redis strings with a TTL (SET EX). The byte budget is the server's: run it with
    `maxmemory` and `maxmemory-policy allkeys-lru` (or a Redis of its own), as DEPLOYMENT.md says."""

    name = "shared"
    PREFIX = "kvcache:kv:"
    local = False

    def __init__(self, url: str, ttl_s: float):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.ttl_s = ttl_s

    def contains(self, keys: list[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self.PREFIX + key)
        return [bool(n) for n in pipe.execute()]

    def get(self, key: str) -> bytes | None:
        return self.client.get(self.PREFIX + key)

    def put(self, key: str, raw: bytes) -> None:
        self.client.set(self.PREFIX + key, raw, ex=max(1, int(self.ttl_s)))

    def remove(self, key: str) -> None:
        self.client.delete(self.PREFIX + key)

    def stats(self) -> dict:
        return {"url_scheme": "redis", "ttl_s": self.ttl_s}


def open_shared_store(url: str, ttl_s: float, budget_bytes: int) -> FsspecStore | RedisStore | None:
    if not url:
        return None
    if url.startswith(("redis://", "rediss://")):
        return RedisStore(url, ttl_s)
    if "://" not in url:
        url = f"file://{Path(url).expanduser()}"
    return FsspecStore(url, ttl_s, budget_bytes)
