"""Failure paths with real processes: a client that goes away, a coordinator restart, a worker
crash. Each test that breaks something runs on a cluster of its own."""

import uuid

import httpx

from services.common.sse import parse_events
from tests.support import assert_well_formed, generate, start_cluster, wait_until


def test_client_disconnect_stops_the_worker(cluster):
    seq = f"gone-{uuid.uuid4().hex[:8]}"
    owner = httpx.get(f"{cluster.coordinator_url}/route/{seq}").json()["address"]
    before = httpx.get(f"{owner}/stats").json()
    body = {"prompt": "a long one", "seq_id": seq, "max_tokens": 900, "temperature": 0}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{cluster.gateway_url}/generate",
                                                           json=body) as resp:
        events = parse_events(resp.iter_lines())
        assert next(events)["type"] == "start"
        assert next(events)["type"] == "token"
    # The gateway closed its upstream stream; the worker drops the request at its next step.
    wait_until(lambda: httpx.get(f"{owner}/stats").json()["aborted"] > before["aborted"],
               what="the worker to abort the request")
    wait_until(lambda: httpx.get(f"{owner}/stats").json()["running"] == 0, what="no running request")
    stats = httpx.get(f"{owner}/stats").json()
    assert stats["generated_tokens"] - before["generated_tokens"] < 900


def test_client_leaving_an_openai_stream_stops_the_worker(cluster):
    session = f"gone-{uuid.uuid4().hex[:8]}"
    owner = httpx.get(f"{cluster.coordinator_url}/route/{session}").json()["address"]
    before = httpx.get(f"{owner}/stats").json()
    body = {"model": "tiny-gpt2", "prompt": "a long one", "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{cluster.gateway_url}/v1/completions", json=body, headers={"X-Session-Id": session}) as resp:
        lines = (line for line in resp.iter_lines() if line.startswith("data: {"))
        assert '"text_completion"' in next(lines) and '"text_completion"' in next(lines)
    wait_until(lambda: httpx.get(f"{owner}/stats").json()["aborted"] > before["aborted"],
               what="the worker to abort the request")
    wait_until(lambda: httpx.get(f"{owner}/stats").json()["running"] == 0, what="no running request")
    assert httpx.get(f"{owner}/stats").json()["generated_tokens"] - before["generated_tokens"] < 900


def test_coordinator_restart_and_worker_crash(tmp_path):
    with start_cluster(tmp_path, num_workers=2) as cluster:
        url = cluster.gateway_url
        kept = generate(url, prompt="before the coordinator stops", max_tokens=4)
        assert_well_formed(kept)
        # Coordinator down: the gateway routes with its last ring; new and continued sequences work.
        cluster.kill("coordinator")
        wait_until(lambda: _gateway_health(url)["status"] == "degraded", what="the gateway to notice")
        assert _gateway_health(url)["ring"]["active_workers"] == 2
        continued = generate(url, prompt=" and on", seq_id=kept.seq_id, max_tokens=4)
        assert_well_formed(continued)
        assert continued.done["worker_id"] == kept.done["worker_id"]
        assert continued.start["cached_tokens"] > 0
        for i in range(4):
            assert_well_formed(generate(url, prompt=f"while it is down {i}", max_tokens=4))
        # It comes back (empty): workers get 404 on heartbeat and register again.
        cluster.start_process("coordinator")
        wait_until(lambda: _num_workers(cluster) == 2, what="workers to re-register")
        wait_until(lambda: _gateway_health(url)["status"] == "ok", what="the gateway to sync again")
        assert_well_formed(generate(url, prompt="after restart", max_tokens=4))

        # Worker crash: until the TTL expires the ring still lists the dead worker; the gateway
        # cannot reach it, leaves it out and re-routes (or answers 503), never hangs. After the
        # TTL the ring has one worker left.
        seq = next(s for s in (f"crash-{i}" for i in range(100)) if _owner(cluster, s) == "worker-1")
        assert_well_formed(generate(url, prompt="before the crash ", seq_id=seq, max_tokens=4))
        cluster.kill("worker-1")
        status = generate(url, prompt="during", seq_id=seq, max_tokens=4, timeout_s=30).status
        assert status in (200, 503)
        wait_until(lambda: _num_workers(cluster) == 1, what="the dead worker to expire")
        moved = generate(url, prompt="after", seq_id=seq, max_tokens=4)
        assert_well_formed(moved)
        assert moved.done["worker_id"] == "worker-0"
        if status == 503:  # the KV died with worker-1: worker-0 starts the sequence anew
            assert moved.start["cached_tokens"] == 0


def _gateway_health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=2).json()


def _num_workers(cluster) -> int:
    try:
        return len(httpx.get(f"{cluster.coordinator_url}/workers", timeout=2).json())
    except httpx.HTTPError:
        return -1


def _owner(cluster, seq: str) -> str:
    return httpx.get(f"{cluster.coordinator_url}/route/{seq}").json()["worker_id"]
