"""Helpers shared by the end-to-end, stress and cache-performance suites (real HTTP)."""

import functools
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.common.sse import aparse_events, parse_events
from services.localcluster import LocalCluster, answers_200, free_port
from services.worker.model.presets import resolve_model_path


class EventsView:
    """Reads a generation's `events` (dicts; an engine sink may also hold a ServiceError)."""

    events: list

    @property
    def start(self) -> dict:
        assert self.events[0]["type"] == "start", self.events
        return self.events[0]

    @property
    def done(self) -> dict:
        assert self.events[-1]["type"] == "done", self.events[-1]
        return self.events[-1]

    @property
    def token_ids(self) -> list[int]:
        return [e["token_id"] for e in self.events if isinstance(e, dict) and e["type"] == "token"]


@dataclass
class Generation(EventsView):
    status: int
    seq_id: str | None
    events: list[dict]


def generate(base_url: str, timeout_s: float = 120.0, headers: dict[str, str] | None = None, **body) -> Generation:
    with httpx.Client(timeout=timeout_s, headers=headers) as client, \
            client.stream("POST", f"{base_url}/generate", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            return Generation(resp.status_code, resp.headers.get("x-seq-id"), [resp.json()])
        events = list(parse_events(resp.iter_lines()))
    return Generation(resp.status_code, resp.headers.get("x-seq-id"), events)


async def agenerate(client: httpx.AsyncClient, base_url: str, **body) -> Generation:
    async with client.stream("POST", f"{base_url}/generate", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return Generation(resp.status_code, resp.headers.get("x-seq-id"), [resp.json()])
        events = [e async for e in aparse_events(resp.aiter_lines())]
    return Generation(resp.status_code, resp.headers.get("x-seq-id"), events)


def assert_well_formed(gen: Generation) -> None:
    """start, tokens with indexes 0..n-1, exactly one terminal event, last."""
    types = [e["type"] for e in gen.events]
    assert gen.status == 200 and types[0] == "start", gen.events[:2]
    assert types[-1] == "done", gen.events[-1]
    assert types.count("done") + types.count("error") == 1
    indexes = [e["index"] for e in gen.events if e["type"] == "token"]
    assert indexes == list(range(len(indexes)))
    assert gen.done["usage"]["completion_tokens"] == len(indexes)


def start_cluster(tmp_dir: Path, num_workers: int = 2, gateway_env: dict[str, str] | None = None,
                  **worker_env: str) -> LocalCluster:
    """A cluster of real processes serving tiny-gpt2, built once into tmp_dir/models."""
    models = tmp_dir / "models"
    resolve_model_path("tiny-gpt2", models)  # build before workers start, not in each of them
    env = {"WORKER_MODEL_CACHE_DIR": str(models), "WORKER_MODEL_NAME": "tiny-gpt2",
           "WORKER_TORCH_THREADS": "1", **worker_env}
    # tmp_dir/sessions.db, named here so that a WORKER_SESSION_STORE_URL exported in the shell
    # does not leak into the tests (worker_env may still name another store)
    store_url = f"sqlite:///{tmp_dir.resolve() / 'sessions.db'}"
    return LocalCluster(num_workers=num_workers, log_dir=tmp_dir / "logs", worker_env=env,
                        gateway_env=gateway_env or {}, session_store_url=store_url).start()


@contextmanager
def extra_gateway(cluster: LocalCluster, log_dir: Path, **env: str):
    """Another gateway process in front of the same cluster, with its own settings."""
    port = free_port()
    env = {**os.environ, "GATEWAY_PORT": str(port), "GATEWAY_COORDINATOR_URL": cluster.coordinator_url,
           "GATEWAY_INTERNAL_TOKEN": cluster.internal_token, **env}
    with open(log_dir / "gateway.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_until(predicate, what: str, timeout_s: float = 30.0, interval_s: float = 0.2, ignoring=()):
    """The predicate's first truthy value, asked every `interval_s`; fails the test after
    `timeout_s`. Exceptions of the types in `ignoring` count as not yet (a service still starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except ignoring:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(interval_s)


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until the service process at `url` answers /health (it must not exit meanwhile)."""
    def healthy() -> bool:
        assert proc.poll() is None, f"the process exited with {proc.returncode}"
        return answers_200(f"{url}/health")

    wait_until(healthy, f"{url} to become healthy", timeout_s=timeout_s, interval_s=0.1)


def connect(port: int, rcvbuf: int | None = None, timeout_s: float = 10.0) -> socket.socket:
    """A raw loopback connection; each read fails after `timeout_s` of silence."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window
    sock.connect(("127.0.0.1", port))
    sock.settimeout(timeout_s)
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything until the server closes (a socket timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers, body) of a server that closes after it."""
    head, _, body = read_to_end(sock).partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines)
    return int(status_line.split()[1]), headers, body


@functools.cache
def _plain_transformers(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def transformers_greedy(cluster: LocalCluster, texts_and_ids: list, max_tokens: int) -> list[int]:
    """What plain transformers generates greedily after a context given as pieces: texts (encoded
    as the worker encodes a prompt) and lists of token ids (a turn's generated tokens). The
    reference for a cluster's output that neither the cluster's KV nor its tiers can touch."""
    import torch

    from tests.unit.test_engine import hf_greedy

    model_dir = resolve_model_path(cluster.worker_env["WORKER_MODEL_NAME"],
                                   Path(cluster.worker_env["WORKER_MODEL_CACHE_DIR"]))
    model, tokenizer = _plain_transformers(str(model_dir))
    context = []
    for piece in texts_and_ids:
        context += tokenizer.encode(piece, add_special_tokens=False) if isinstance(piece, str) else list(piece)
    with torch.no_grad():
        return hf_greedy(model, context, max_tokens)
