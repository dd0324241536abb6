"""The three services as real processes on loopback, talking real HTTP."""

import asyncio
import statistics
import threading
import time
import uuid

import httpx

from tests.support import agenerate, assert_well_formed, generate, transformers_greedy


def test_continuation_equals_generation_from_scratch(cluster):
    url, seq = cluster.gateway_url, f"conv-{uuid.uuid4().hex[:8]}"
    first = generate(url, prompt="The cache must never change the output. ", seq_id=seq,
                     max_tokens=12, temperature=0)
    assert_well_formed(first)
    follow = "And the next turn asks more: "
    cont = generate(url, prompt=follow, seq_id=seq, max_tokens=12, temperature=0)
    assert_well_formed(cont)

    earlier_context = first.done["usage"]["context_tokens"] + first.done["usage"]["completion_tokens"]
    # All of it reused, but the first turn's last token if the continuation came before that
    # token's own step (WORKER_TAIL_WAIT_S): then it computed that one in its prefill.
    assert cont.start["cached_tokens"] in (earlier_context - 1, earlier_context)
    assert cont.done["usage"]["cached_tokens"] == cont.start["cached_tokens"]
    assert cont.start["context_tokens"] == earlier_context + len(follow.encode())

    # The same context computed by plain transformers (a fresh conversation on the cluster may
    # itself load this one's chunks from the KV tiers: content-addressed)
    reference = transformers_greedy(cluster, ["The cache must never change the output. ", first.token_ids,
                                              follow], 12)
    assert cont.token_ids == reference
    whole = "The cache must never change the output. " + first.done["text"] + follow
    fresh = generate(url, prompt=whole, seq_id=f"fresh-{uuid.uuid4().hex[:8]}", max_tokens=12, temperature=0)
    assert fresh.start["cached_tokens"] == fresh.start["tier_tokens"]  # only ever from the tiers
    assert fresh.start["context_tokens"] == cont.start["context_tokens"]
    assert fresh.token_ids == reference
    assert fresh.done["text"] == cont.done["text"]


def test_same_seq_id_reaches_the_same_worker(cluster):
    seq = f"sticky-{uuid.uuid4().hex[:8]}"
    workers = {generate(cluster.gateway_url, prompt="x", seq_id=seq, max_tokens=1).done["worker_id"]
               for _ in range(20)}
    assert len(workers) == 1
    route = httpx.get(f"{cluster.coordinator_url}/route/{seq}").json()
    assert workers == {route["worker_id"]}


def test_the_reference_suites_contract(cluster):
    """What the reference implementation's tests call: /kv/route, model_name "gpt2" (a served
    name), the prompt in `start`, /workers as a map, and a worker's /inference/model/info."""
    seq = f"ref-{uuid.uuid4().hex[:8]}"
    gen = generate(cluster.gateway_url, prompt="Once upon a time", seq_id=seq, max_tokens=3, model_name="gpt2")
    assert gen.start["prompt"] == "Once upon a time"
    route = httpx.get(f"{cluster.coordinator_url}/kv/route/{seq}").json()
    assert route == httpx.get(f"{cluster.coordinator_url}/route/{seq}").json()
    assert route["worker_id"] == gen.done["worker_id"]
    workers = httpx.get(f"{cluster.coordinator_url}/workers").json()
    assert set(workers) == {"worker-0", "worker-1"}
    info = httpx.get(f"{workers[route['worker_id']]['address']}/inference/model/info").json()
    assert info["loaded"] and info["model_info"]["served_model_names"] == ["tiny-gpt2", "gpt2"]
    assert info["model_info"]["max_model_len"] == 1024 and info["model_info"]["num_parameters"] > 0
    assert 0 < info["kv_cache"]["bytes_used"] <= info["kv_cache"]["bytes_limit"]


def test_sequences_spread_over_workers(cluster):
    owners = {httpx.get(f"{cluster.coordinator_url}/route/s-{i}").json()["worker_id"] for i in range(50)}
    assert owners == {"worker-0", "worker-1"}


async def test_eight_concurrent_sequences_complete(cluster):
    async with httpx.AsyncClient(timeout=120) as client:
        gens = await asyncio.gather(*(
            agenerate(client, cluster.gateway_url, prompt=f"concurrent {i} " * (i + 1),
                      seq_id=f"c8-{uuid.uuid4().hex[:6]}-{i}", max_tokens=16 + i, temperature=0.7, seed=i)
            for i in range(8)))
    for i, gen in enumerate(gens):
        assert_well_formed(gen)
        assert gen.done["usage"]["completion_tokens"] == 16 + i


def test_health_stays_fast_while_generating(cluster):
    """A forward pass on the event loop would stall /health for the whole generation."""
    worker = cluster.worker_urls[0]
    gen_thread = threading.Thread(target=generate, args=(worker,), kwargs=dict(
        prompt="long generation " * 40, max_tokens=300, temperature=0, headers=cluster.internal_headers))
    gen_thread.start()
    latencies_ms = []
    with httpx.Client(timeout=5) as client:
        while gen_thread.is_alive() and len(latencies_ms) < 100:
            t0 = time.perf_counter()
            assert client.get(f"{worker}/health").status_code == 200
            latencies_ms.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.02)
    gen_thread.join()
    print(f"/health while generating: n={len(latencies_ms)} median={statistics.median(latencies_ms):.1f} ms "
          f"max={max(latencies_ms):.1f} ms")
    assert len(latencies_ms) >= 10
    assert statistics.median(latencies_ms) < 50
    assert max(latencies_ms) < 1000


def test_bad_inputs_get_json_4xx(cluster):
    url = cluster.gateway_url
    cases = [
        ({"prompt": ""}, 422), ({"max_tokens": 5}, 422), ({"prompt": "x", "seq_id": "bad id"}, 422),
        ({"prompt": "x", "max_tokens": 0}, 422), ({"prompt": "x", "temperature": 2.5}, 422),
        ({"prompt": "x", "top_p": 0}, 422), ({"prompt": "x", "unknown": 1}, 422),
        ({"prompt": "x", "model_name": "not-served"}, 404),
        ({"prompt": "x" * 1020, "max_tokens": 50}, 400),
    ]
    for body, status in cases:
        resp = httpx.post(f"{url}/generate", json=body, timeout=30)
        assert resp.status_code == status, (body, resp.text)
        assert set(resp.json()["error"]) >= {"type", "message"}, resp.text
    resp = httpx.post(f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 422 and "error" in resp.json()


def test_non_streaming_and_delete(cluster):
    url, seq = cluster.gateway_url, f"ns-{uuid.uuid4().hex[:8]}"
    resp = httpx.post(f"{url}/generate", json={"prompt": "hello", "seq_id": seq, "stream": False,
                                               "max_tokens": 5, "temperature": 0}, timeout=60)
    assert resp.status_code == 200 and resp.headers["x-seq-id"] == seq
    body = resp.json()
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 5
    assert httpx.delete(f"{url}/sequences/{seq}").status_code == 200
    assert httpx.delete(f"{url}/sequences/{seq}").status_code == 404
    again = generate(url, prompt="hello", seq_id=seq, max_tokens=1)
    assert again.start["context_tokens"] == 5  # a new sequence, not a continuation


def test_cluster_stats(cluster):
    generate(cluster.gateway_url, prompt="stats", max_tokens=2)
    stats = httpx.get(f"{cluster.gateway_url}/stats", timeout=10).json()
    assert stats["num_workers"] == 2 and not stats["unreachable"]
    assert stats["totals"]["requests"] >= 1
    assert httpx.get(f"{cluster.gateway_url}/metrics").text.count("kvcache_gateway_") > 0
