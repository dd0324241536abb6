"""Stress on loopback with bounded counts and durations: every request succeeds, every stream
ends with exactly one `done`, nothing hangs. Figures are printed, not asserted."""

import asyncio
import random
import statistics
import time
import uuid

import httpx
import pytest

from tests.support import agenerate, assert_well_formed, start_cluster

REQUEST_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("stress"), num_workers=2)
    yield cluster
    cluster.stop()


async def run_all(url: str, bodies: list[dict]) -> list:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        return await asyncio.wait_for(asyncio.gather(*(agenerate(client, url, **b) for b in bodies)),
                                      timeout=REQUEST_TIMEOUT_S * 2)


def check_all(gens: list, label: str) -> None:
    for gen in gens:
        assert_well_formed(gen)
    ttfts = [g.done["timings"]["ttft_ms"] for g in gens]
    print(f"\n{label}: {len(gens)} ok, ttft median {statistics.median(ttfts):.0f} ms, max {max(ttfts):.0f} ms")


def body(i: int, prompt_len: int = 20, max_tokens: int = 16, **extra) -> dict:
    return {"prompt": f"req {i} " + "z" * prompt_len, "seq_id": f"st-{uuid.uuid4().hex[:8]}-{i}",
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, **extra}


async def test_twenty_concurrent_requests(cluster):
    gens = await run_all(cluster.gateway_url, [body(i) for i in range(20)])
    check_all(gens, "20 concurrent")
    assert {g.done["worker_id"] for g in gens} == {"worker-0", "worker-1"}


async def test_bursts(cluster):
    for burst in range(3):
        gens = await run_all(cluster.gateway_url, [body(i, max_tokens=8) for i in range(12)])
        check_all(gens, f"burst {burst}")
        await asyncio.sleep(0.5)


async def test_mixed_short_medium_long(cluster):
    rng = random.Random(7)
    shapes = [(10, 4), (100, 16), (400, 48)]  # (prompt tokens, max tokens)
    bodies = [body(i, *rng.choice(shapes)) for i in range(18)]
    gens = await run_all(cluster.gateway_url, bodies)
    check_all(gens, "mixed")
    assert [g.done["usage"]["completion_tokens"] for g in gens] == [b["max_tokens"] for b in bodies]


async def test_sustained_load_with_continuations(cluster):
    """8 clients for 30 s, each continuing its own conversation turn after turn."""
    deadline = time.monotonic() + 30
    results = []

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        seq = f"sustained-{c}-{uuid.uuid4().hex[:6]}"
        turn = 0
        while time.monotonic() < deadline and turn < 40:  # bounded in time and count
            gen = await agenerate(client, cluster.gateway_url, prompt=f" turn {turn}.", seq_id=seq,
                                  max_tokens=8, temperature=0.7, seed=turn)
            results.append((c, turn, gen))
            turn += 1

    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        await asyncio.wait_for(asyncio.gather(*(client_loop(client, c) for c in range(8))), timeout=150)
    for _, turn, gen in results:
        assert_well_formed(gen)
        if turn > 0:
            assert gen.done["usage"]["cached_tokens"] > 0
    print(f"\nsustained: {len(results)} requests in 30 s, all done")
    assert len(results) >= 8
