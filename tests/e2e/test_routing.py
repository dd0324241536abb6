"""Routing off the hot path, with real processes on loopback: every gateway follows the
coordinator's ring within a second, and bounded loads cap a hot worker while keeping histories."""

import asyncio
import threading
import time
import uuid

import httpx
import pytest

from services.common.hash_ring import HashRing
from tests.support import agenerate, assert_well_formed, extra_gateway

pytestmark = pytest.mark.e2e

SYNC_LIMIT_S = 1.0
LOAD_FACTOR = 1.25
NUM_SESSIONS = 200


def ring_state(cluster) -> dict:
    return httpx.get(f"{cluster.coordinator_url}/ring", timeout=5).json()


def wait_for_change(cluster, before: dict, seen: dict) -> None:
    """Long-polls the coordinator: records when the version moved past `before` and the epoch."""
    params = {"after": before["version"], "instance": before["instance"], "wait_s": 30}
    seen["ring"] = httpx.get(f"{cluster.coordinator_url}/ring", params=params, timeout=40).json()
    seen["at"] = time.monotonic()


def seconds_until_epoch(gateway_url: str, epoch: int, since: float) -> float:
    with httpx.Client(timeout=5) as client:
        while client.get(f"{gateway_url}/health").json()["ring"]["epoch"] < epoch:
            assert time.monotonic() - since < 10, f"{gateway_url} never reached epoch {epoch}"
            time.sleep(0.005)
    return time.monotonic() - since


def test_every_gateway_follows_a_join_and_a_leave_within_a_second(cluster, tmp_path):
    ghost = {"worker_id": f"ghost-{uuid.uuid4().hex[:6]}", "address": cluster.worker_urls[0],
             "model_name": "tiny-gpt2"}
    with extra_gateway(cluster, tmp_path) as second:
        for path, body in (("/register", ghost), ("/deregister", {"worker_id": ghost["worker_id"]})):
            before, seen = ring_state(cluster), {}
            watcher = threading.Thread(target=wait_for_change, args=(cluster, before, seen))
            watcher.start()
            time.sleep(0.2)  # the watcher's long poll is waiting
            token = {"Authorization": f"Bearer {cluster.internal_token}"}  # membership writes need it
            answer = httpx.post(f"{cluster.coordinator_url}{path}", json=body, headers=token, timeout=5)
            assert answer.status_code == 200
            watcher.join(timeout=10)
            epoch = seen["ring"]["epoch"]
            assert epoch == before["epoch"] + 1
            for gateway in (cluster.gateway_url, second):
                assert seconds_until_epoch(gateway, epoch, seen["at"]) <= SYNC_LIMIT_S, (path, gateway)
            assert_well_formed_via(second)


def assert_well_formed_via(gateway_url: str) -> None:
    gen = asyncio.run(_one(gateway_url))
    assert_well_formed(gen)


async def _one(gateway_url: str):
    async with httpx.AsyncClient(timeout=60) as client:
        return await agenerate(client, gateway_url, prompt="ring", max_tokens=2, temperature=0)


def skewed_sessions(cluster, owner: str, count: int) -> list[str]:
    """Session ids that all hash to `owner` on the cluster's current ring."""
    state = ring_state(cluster)
    active = [w["worker_id"] for w in state["workers"] if w["state"] == "active"]
    ring = HashRing.of(active, state["vnodes"])
    ids = (f"hot-{uuid.uuid4().hex[:8]}-{i}" for i in range(100_000))
    return [s for s, _ in zip((s for s in ids if ring.owner(s) == owner), range(count))]


class InFlightSampler:
    """Samples every worker's requests in progress while a burst runs."""

    def __init__(self, worker_urls: list[str]) -> None:
        self.worker_urls = worker_urls
        self.samples: list[tuple[int, list[int]]] = []  # (finished by the client then, in flight)
        self.finished = 0
        self.stop = False

    async def run(self, client: httpx.AsyncClient) -> None:
        while not self.stop:
            finished = self.finished
            try:
                answers = await asyncio.gather(*(client.get(f"{url}/stats") for url in self.worker_urls))
            except httpx.TransportError:  # a kept-alive connection the worker closed meanwhile
                continue  # a missed sample; the next one is 20 ms away
            if self.finished == finished:  # no request ended while sampling
                self.samples.append((finished, [a.json()["in_flight"] for a in answers]))
            await asyncio.sleep(0.02)


async def burst(gateway_url: str, sampler: InFlightSampler, sessions: list[str], prompt: str) -> list:
    limits = httpx.Limits(max_connections=NUM_SESSIONS + 20)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        sampler.finished, sampler.stop = 0, False

        async def one(seq_id: str):
            # 64 tokens: the burst stays whole for long enough that the sampler sees it (at 24,
            # runs on 2 busy cores caught only 0-2 samples with >= 90% in flight)
            gen = await agenerate(client, gateway_url, prompt=prompt, seq_id=seq_id, max_tokens=64,
                                  temperature=0)
            sampler.finished += 1
            return gen

        watcher = asyncio.create_task(sampler.run(client))
        try:
            return await asyncio.gather(*(one(s) for s in sessions))
        finally:
            sampler.stop = True
            await watcher


def test_bounded_loads_cap_a_hot_worker_and_keep_every_history(cluster, tmp_path):
    owner = "worker-0"
    sessions = skewed_sessions(cluster, owner, NUM_SESSIONS)
    sampler = InFlightSampler(cluster.worker_urls)
    with extra_gateway(cluster, tmp_path, GATEWAY_LOAD_FACTOR=str(LOAD_FACTOR)) as gateway:
        first = asyncio.run(burst(gateway, sampler, sessions, "one two three"))
        first_samples = list(sampler.samples)
        second = asyncio.run(burst(gateway, sampler, sessions, " four five"))
        metrics = httpx.get(f"{gateway}/metrics").text
    for gen in first + second:
        assert_well_formed(gen)
    # Every continuation kept its history: its context is the first turn's (prompt and answer)
    # plus its own prompt, wherever either turn ran.
    for a, b in zip(first, second):
        earlier = a.done["usage"]["context_tokens"] + a.done["usage"]["completion_tokens"]
        assert b.start["context_tokens"] == earlier + b.done["usage"]["prompt_tokens"]
    spilled = sum(g.done["worker_id"] != owner for g in first)
    assert spilled >= NUM_SESSIONS * (1 - LOAD_FACTOR / 2) - 2, spilled  # the owner kept at most ~62.5%
    # No worker held more than factor x the burst's average + 1 at any sample (a request is placed
    # against the load of the moment, never above the burst's: finished requests only lower it),
    # and at least two samples saw >= 90% of the burst in flight. (Asking for all 200 at once is a
    # race: the first may finish before the last one reaches its worker.) The plain ring would put
    # all 200 on the owner.
    samples = [loads for _, loads in first_samples + sampler.samples]
    assert len([loads for loads in samples if sum(loads) >= 0.9 * NUM_SESSIONS]) >= 2, first_samples[-5:]
    bound = LOAD_FACTOR * NUM_SESSIONS / len(cluster.worker_urls) + 1
    for loads in samples:
        assert max(loads) <= bound, loads
    assert 'kvcache_gateway_routing_decisions_total{decision="spilled"}' in metrics
    spilled_count = next(line for line in metrics.splitlines()
                         if line.startswith('kvcache_gateway_routing_decisions_total{decision="spilled"}'))
    assert float(spilled_count.split()[-1]) >= spilled
