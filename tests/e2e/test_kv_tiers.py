"""The shared KV tier across real processes (loopback, a real redis-server as the shared tier):
a crashed worker's conversations continue on the new owner with their history loaded, not
recomputed, with the output a fresh computation gives; a DELETE takes the chunks out."""

import uuid

import httpx
import pytest
import redis

from tests.conftest import require_redis_server
from tests.redis_server import RedisServer
from tests.support import assert_well_formed, generate, start_cluster, transformers_greedy, wait_until

pytestmark = pytest.mark.e2e

PROMPT = "A conversation long enough to fill more than one chunk of sixty-four positions. " * 2


def owned_by(cluster, worker: str) -> str:
    for _ in range(500):
        seq = f"tier-{uuid.uuid4().hex[:8]}"
        if httpx.get(f"{cluster.coordinator_url}/route/{seq}", timeout=5).json()["worker_id"] == worker:
            return seq
    raise AssertionError(f"no seq_id routed to {worker}")


def chunk_keys(url: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter("kvcache:kv:*"))


def test_a_crashed_workers_conversations_continue_from_the_shared_tier(tmp_path):
    require_redis_server()
    with RedisServer() as kv_redis, start_cluster(tmp_path, num_workers=2, WORKER_KV_SHARED_URL=kv_redis.url) as cluster:
        url = cluster.gateway_url
        seqs = [owned_by(cluster, "worker-1") for _ in range(3)]
        first = {s: generate(url, prompt=s + PROMPT, seq_id=s, max_tokens=6, temperature=0) for s in seqs}
        earlier = {s: g.done["usage"]["context_tokens"] + g.done["usage"]["completion_tokens"]
                   for s, g in first.items()}
        # written behind after each turn: whole chunks plus each sequence's tail (no chunk in common)
        wait_until(lambda: len(chunk_keys(kv_redis.url)) >= 3 * (max(earlier.values()) // 64 + 1),
                   "the write-behind of every conversation")
        cluster.kill("worker-1")
        for s in seqs:
            follow = generate(url, prompt=" And then?", seq_id=s, max_tokens=6, temperature=0)
            assert_well_formed(follow)
            assert follow.start["worker_id"] == "worker-0"
            assert follow.start["context_tokens"] == earlier[s] + len(" And then?")  # nothing lost
            assert follow.start["cached_tokens"] == follow.start["tier_tokens"] == earlier[s]  # loaded
            assert follow.start["handoff_tokens"] == 0  # its owner is gone
            assert follow.token_ids == transformers_greedy(cluster, [s + PROMPT, first[s].token_ids, " And then?"], 6)
        stats = httpx.get(f"{cluster.worker_urls[0]}/stats", timeout=5).json()
        assert stats["kv_tiers"]["tiers"]["shared"]["hits"] >= 3 and stats["tier_tokens"] >= sum(earlier.values())
        metrics = httpx.get(f"{cluster.worker_urls[0]}/metrics", timeout=5).text
        assert 'kvcache_worker_kv_tier_hits_total{tier="shared"}' in metrics


def test_delete_removes_the_conversations_chunks_from_the_shared_tier(tmp_path):
    require_redis_server()
    with RedisServer() as kv_redis, start_cluster(tmp_path, num_workers=1, WORKER_KV_SHARED_URL=kv_redis.url) as cluster:
        url, seq = cluster.gateway_url, f"del-{uuid.uuid4().hex[:8]}"
        generate(url, prompt=PROMPT, seq_id=seq, max_tokens=4, temperature=0)
        generate(url, prompt=" More.", seq_id=seq, max_tokens=4, temperature=0)  # a second turn: another tail
        wait_until(lambda: len(chunk_keys(kv_redis.url)) >= 3, "the write-behind")
        assert httpx.delete(f"{url}/sequences/{seq}", timeout=10).status_code == 200
        wait_until(lambda: chunk_keys(kv_redis.url) == [], "the chunks removed")
