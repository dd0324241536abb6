"""Faults injected into a running cluster of real processes, with exact history accounting: after
each, every conversation holds exactly the turns its client was told succeeded or learned were
stored, once each, in order, and nothing else. Bounded: each test runs for seconds."""

import socket
import threading
import time

import httpx
import pytest

from tests.chaos.conftest import SLOW_CLIENT_TIMEOUT_S, as_user
from tests.chaos.ledger import COUNTS, attempt, check_histories, outcomes_of, run_conversations
from tests.support import wait_until

CONVERSATIONS = 8


def traffic_retried(ledger) -> int:
    return sum(n for outcome, n in ledger.outcomes.items() if outcome.startswith("retry"))


def test_redis_stopped_killed_and_restarted_mid_traffic(chaos_cluster, redis_server):
    target = as_user(chaos_cluster, "alice")

    def faults():
        for stop in (redis_server.stop, redis_server.kill):  # SIGTERM, then SIGKILL
            time.sleep(1.5)
            stop()
            COUNTS["faults injected"] += 1
            time.sleep(2.0)
            redis_server.start()
        time.sleep(1.5)

    # The clients give up 8 s after the last restart, and the check waits 8 s more for open turns:
    # a turn the store could not close must be settled within seconds of its return, not left
    # open for its 30 s lease (without turn_repairs this fails).
    ledger = run_conversations(target, [f"redis-{i}" for i in range(CONVERSATIONS)], faults, budget_s=17.0)
    check_histories(target, ledger, settle_s=8.0)
    assert traffic_retried(ledger) > 0, ledger.outcomes  # the faults met traffic
    assert sum(len(done) for done in ledger.told_done.values()) >= CONVERSATIONS


def kill_and_restart(cluster, name: str, down_s: float):
    """Faults: SIGKILL `name` once traffic runs, start it again `down_s` later, let traffic go on."""
    def faults():
        time.sleep(1.5)
        cluster.kill(name)
        COUNTS["faults injected"] += 1
        time.sleep(down_s)
        cluster.start_process(name)
        cluster.wait_ready(names=[name])
        time.sleep(1.5)
    return faults


def test_a_worker_killed_mid_stream(chaos_cluster):
    target = as_user(chaos_cluster, "alice")
    ledger = run_conversations(target, [f"wkill-{i}" for i in range(CONVERSATIONS)],
                               kill_and_restart(chaos_cluster, "worker-1", down_s=2.0))
    check_histories(target, ledger)
    assert sum(len(done) for done in ledger.told_done.values()) >= CONVERSATIONS


def test_the_gateway_killed_mid_stream_then_clients_retry_with_their_keys(chaos_cluster):
    target = as_user(chaos_cluster, "alice")
    ledger = run_conversations(target, [f"gkill-{i}" for i in range(CONVERSATIONS)],
                               kill_and_restart(chaos_cluster, "gateway", down_s=0.5))
    check_histories(target, ledger)
    assert traffic_retried(ledger) > 0, ledger.outcomes


def test_concurrent_duplicates_append_once(chaos_cluster):
    target = as_user(chaos_cluster, "alice")
    results = []

    def send():
        with httpx.Client(timeout=30.0) as client:
            results.append(attempt(client, target, "dups", "same-key", " once.", 8))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    COUNTS["faults injected"] += 1
    kinds = sorted(kind for kind, _ in results)
    assert kinds.count("done") == 1, results  # the others: 409 duplicate_turn, running or stored
    wait_until(lambda: not outcomes_of(target, "dups")["open_turn"], "the turn to close")
    seen = outcomes_of(target, "dups")
    assert [t["turn_id"] for t in seen["turns"]] == ["same-key"]
    assert seen["history_tokens"] == seen["turns"][0]["prompt_tokens"] + seen["turns"][0]["completion_tokens"]
    COUNTS["histories checked"] += 1


def test_internal_routes_refuse_calls_without_the_token(chaos_cluster):
    worker, coordinator = chaos_cluster.worker_urls[0], chaos_cluster.coordinator_url
    calls = [("POST", f"{worker}/generate", {"prompt": "hi", "seq_id": "x"}),
             ("POST", f"{worker}/completions", {"prompt": "hi"}),
             ("GET", f"{worker}/sequences/x", None), ("DELETE", f"{worker}/sequences/x", None),
             ("GET", f"{worker}/internal/sequences/x/kv", None), ("DELETE", f"{worker}/internal/sequences/x/kv", None),
             ("POST", f"{worker}/internal/drain", None),
             ("POST", f"{coordinator}/register", {"worker_id": "evil", "address": "http://127.0.0.1:9"}),
             ("POST", f"{coordinator}/heartbeat", {"worker_id": "worker-0"}),
             ("POST", f"{coordinator}/deregister", {"worker_id": "worker-0"}),
             ("POST", f"{coordinator}/drain", {"worker_id": "worker-0"})]
    with httpx.Client(timeout=10.0) as client:
        for method, url, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                response = client.request(method, url, json=body, headers=headers)
                assert response.status_code == 401, (method, url, response.status_code, response.text)
                COUNTS["token-less calls refused"] += 1
    assert chaos_cluster.registered_workers() == {"worker-0", "worker-1"}


def test_tenants_cannot_see_continue_or_delete_each_others_conversations(chaos_cluster):
    alice, bob = as_user(chaos_cluster, "alice"), as_user(chaos_cluster, "bob")
    team_1, team_2 = as_user(chaos_cluster, "team-1"), as_user(chaos_cluster, "team-2")
    with httpx.Client(timeout=30.0) as client:
        for t in range(2):
            assert attempt(client, alice, "shared-name", f"k{t}", f" alice {t}.", 6)[0] == "done"
        before = outcomes_of(alice, "shared-name")
        assert outcomes_of(bob, "shared-name") is None  # not even its existence
        gone = client.delete(f"{bob.url}/sequences/shared-name", headers=bob.headers)
        assert gone.status_code == 404
        mine = client.post(f"{bob.url}/generate", headers={**bob.headers, "Idempotency-Key": "k0"},
                           json={"prompt": " bob.", "seq_id": "shared-name", "max_tokens": 4, "stream": False})
        assert mine.status_code == 200 and mine.json()["seq_id"] == "shared-name"
        assert mine.json()["usage"]["context_tokens"] == len(" bob.")  # a fresh conversation of his own
        wait_until(lambda: not outcomes_of(alice, "shared-name")["open_turn"], "alice's last turn to close")
        assert outcomes_of(alice, "shared-name") == before
        assert attempt(client, team_1, "team-conv", "t0", " team.", 4)[0] == "done"
        shared = outcomes_of(team_2, "team-conv")  # two keys of one tenant share its namespace
        assert shared is not None and [t["turn_id"] for t in shared["turns"]] == ["t0"]
    COUNTS["cross-tenant attempts refused"] += 3


def test_a_20_mb_body_is_refused_before_it_is_read(chaos_cluster):
    target = as_user(chaos_cluster, "alice")
    body = b'{"prompt": "' + b"x" * (20 * 2**20) + b'"}'
    started = time.monotonic()
    with httpx.Client(timeout=30.0) as client:
        try:
            response = client.post(f"{target.url}/generate", content=body,
                                   headers={**target.headers, "content-type": "application/json"})
            assert response.status_code == 413 and response.json()["error"]["type"] == "request_too_large"
        except httpx.WriteError:
            pass  # the gateway answered 413 and closed while the body was still going out
        COUNTS["faults injected"] += 1
        assert time.monotonic() - started < 20
        assert client.get(f"{target.url}/health").status_code == 200


def test_slowloris_clients_are_cut_off_while_others_are_served(chaos_cluster):
    """40 connections that send half a request head or half a body, then nothing: each is closed
    (or answered 408) within a few timeouts, and conversations go on meanwhile."""
    target = as_user(chaos_cluster, "alice")
    port = int(target.url.rsplit(":", 1)[1])
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with_body = head + b"Authorization: " + target.headers["Authorization"].encode() + \
        b"\r\nContent-Length: 1000\r\n\r\n{\"prompt\": "
    slow = []
    for i in range(40):
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
        conn.sendall(head if i % 2 else with_body)
        slow.append(conn)
    ledger = run_conversations(target, ["slow-0", "slow-1"], lambda: time.sleep(1.0), max_turns=3, budget_s=20.0)
    assert all(len(ledger.told_done.get(s, {})) == 3 for s in ("slow-0", "slow-1")), ledger.outcomes
    deadline = time.monotonic() + 5 * SLOW_CLIENT_TIMEOUT_S + 5
    for conn in slow:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        answer = b""
        try:
            while chunk := conn.recv(4096):  # b"" once the gateway closes it
                answer += chunk
        except TimeoutError:
            raise AssertionError("a slow connection was still open") from None
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer[:80]
        conn.close()
        COUNTS["slowloris connections cut off"] += 1
    COUNTS["faults injected"] += 1
