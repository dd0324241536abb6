"""Conversations survive membership changes (real processes on loopback, greedy comparisons):
scale-out hands KV over, a graceful scale-in and then a rolling restart under load lose nothing,
a SIGKILLed worker's stream migrates, and two workers racing on one sequence."""

import threading
import time
import uuid

import httpx
import pytest

from tests.conftest import require_redis_server
from tests.redis_server import RedisServer
from tests.support import assert_well_formed, generate, start_cluster, transformers_greedy

pytestmark = pytest.mark.e2e


def owner(cluster, seq: str) -> str:
    return httpx.get(f"{cluster.coordinator_url}/route/{seq}", timeout=5).json()["worker_id"]


def context_after(gen) -> int:
    """The sequence's length once this turn is done (its context plus what it generated)."""
    return gen.done["usage"]["context_tokens"] + gen.done["usage"]["completion_tokens"]


def test_scale_out_hands_off_kv_and_loses_no_history(tmp_path):
    with start_cluster(tmp_path, num_workers=2) as cluster:
        url = cluster.gateway_url
        seqs = [f"so-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        first = {s: generate(url, prompt=f"Conversation {s} opens. ", seq_id=s, max_tokens=6, temperature=0)
                 for s in seqs}
        before = {s: owner(cluster, s) for s in seqs}
        cluster.add_worker()
        moved = [s for s in seqs if owner(cluster, s) != before[s]]
        assert moved and all(owner(cluster, s) == "worker-2" for s in moved)
        for s in seqs:
            follow = generate(url, prompt=" Next.", seq_id=s, max_tokens=6, temperature=0)
            assert_well_formed(follow)
            earlier = context_after(first[s])
            assert follow.start["context_tokens"] == earlier + len(" Next.")  # nothing lost
            assert follow.start["cached_tokens"] == earlier
            expected_handoff = earlier if s in moved else 0
            assert follow.start["handoff_tokens"] == expected_handoff, s
            assert follow.done["usage"]["handoff_tokens"] == expected_handoff
            if s in moved:
                assert follow.token_ids == transformers_greedy(
                    cluster, [f"Conversation {s} opens. ", first[s].token_ids, " Next."], 6)
        metrics = httpx.get(f"{cluster.worker_urls[-1]}/metrics", timeout=5).text
        assert f"kvcache_worker_handoff_duration_seconds_count {float(len(moved))}" in metrics


class Load:
    """Multi-turn conversations sent one turn after another from a few threads, checking after
    every turn that the context grew by exactly the previous turn (no history lost)."""

    def __init__(self, url: str, num_threads: int = 3, turns: int = 1000):
        self.url, self.turns = url, turns
        self.errors: list[str] = []
        self.handoff_tokens = 0
        self.requests = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(num_threads)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _run(self, index: int) -> None:
        seqs = {f"load-{index}-{k}-{uuid.uuid4().hex[:6]}": 0 for k in range(4)}
        for _ in range(self.turns):
            for seq, length in seqs.items():
                if self._stop.is_set():
                    return
                gen = generate(self.url, prompt=" turn.", seq_id=seq, max_tokens=4, temperature=0, timeout_s=60)
                self.requests += 1
                if gen.status != 200 or gen.events[-1]["type"] != "done":
                    self.errors.append(f"{seq}: {gen.status} {gen.events[-1]}")
                    continue
                if gen.start["context_tokens"] != length + len(" turn."):
                    self.errors.append(f"{seq}: context {gen.start['context_tokens']}, expected "
                                       f"{length + len(' turn.')}")
                self.handoff_tokens += gen.start["handoff_tokens"]
                seqs[seq] = context_after(gen)


def test_graceful_scale_in_then_a_rolling_restart_under_load_lose_nothing(tmp_path):
    """Under load: a graceful scale-in (worker-0 drained and gone: its sequences' KV is pulled by
    worker-1, not recomputed), then a rolling restart (every worker drained and started again, one
    after the other). One cluster for both: each drain of the restart is a scale-in."""
    with start_cluster(tmp_path, num_workers=2, WORKER_DRAIN_TIMEOUT_S="3") as cluster:
        with Load(cluster.gateway_url) as load:
            time.sleep(2)
            assert cluster.drain("worker-0") == 0
            time.sleep(2)  # serving on one worker
            scaled_in = (list(load.errors), load.handoff_tokens)
            for name in ("worker-0", "worker-1"):
                if name != "worker-0":
                    time.sleep(1)
                    assert cluster.drain(name) == 0
                cluster.start_process(name)
                cluster.wait_ready(120)
            time.sleep(1)
        assert scaled_in[0] == [] and scaled_in[1] > 0  # worker-0's sequences were pulled
        assert load.errors == [] and load.requests > 20


def test_sigkill_mid_stream_migrates_with_the_same_tokens(tmp_path):
    with start_cluster(tmp_path, num_workers=2) as cluster:
        url = cluster.gateway_url
        seq = next(s for s in (f"kill-{i}" for i in range(100)) if owner(cluster, s) == "worker-1")
        opening = generate(url, prompt="Before the crash: ", seq_id=seq, max_tokens=5, temperature=0)
        history = "Before the crash: " + opening.done["text"]
        reference = generate(url, prompt=history + " Then?", seq_id=f"ref-{uuid.uuid4().hex[:6]}",
                             max_tokens=400, temperature=0)
        body = {"prompt": " Then?", "seq_id": seq, "max_tokens": 400, "temperature": 0}
        events = []
        with httpx.Client(timeout=120) as client, client.stream("POST", f"{url}/generate", json=body) as resp:
            from services.common.sse import parse_events
            for event in parse_events(resp.iter_lines()):
                events.append(event)
                if event["type"] == "token" and event["index"] == 20:
                    cluster.kill("worker-1")
        types = [e["type"] for e in events]
        assert types.count("start") == 1 and types.count("done") == 1 and types[-1] == "done", events[-1]
        token_ids = [e["token_id"] for e in events if e["type"] == "token"]
        assert [e["index"] for e in events if e["type"] == "token"] == list(range(400))
        assert token_ids == reference.token_ids
        assert events[-1]["worker_id"] == "worker-0"
        # The next turn has the whole history (the KV died with worker-1: recomputed).
        follow = generate(url, prompt=" More.", seq_id=seq, max_tokens=3, temperature=0)
        assert follow.start["context_tokens"] == context_after(opening) + len(" Then?") + 400 + len(" More.")


def test_one_sequence_on_two_workers_at_once_never_interleaves(cluster):
    seq = f"race-{uuid.uuid4().hex[:8]}"
    body = {"prompt": "Two at once. ", "seq_id": seq, "max_tokens": 150, "temperature": 0}
    results = [None, None]

    def call(i: int) -> None:
        results[i] = generate(cluster.worker_urls[i], headers=cluster.internal_headers, **body)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status != 200]
    assert len(ok) >= 1
    for r in refused:
        assert r.status == 409 and r.events[0]["error"]["type"] == "sequence_conflict"
    total = sum(r.done["usage"]["completion_tokens"] + r.done["usage"]["prompt_tokens"] for r in ok)
    after = generate(cluster.gateway_url, prompt="!", seq_id=seq, max_tokens=1)
    assert after.start["context_tokens"] == total + 1  # every accepted turn, whole, nothing else
    if len(ok) == 2:  # the second waited for the first: it saw its whole turn
        assert sorted(r.start["context_tokens"] for r in ok) == [13, 13 + 150 + 13]


def test_store_outage_is_503_and_loses_nothing(tmp_path):
    require_redis_server()
    with RedisServer(tmp_path / "redis") as store, \
            start_cluster(tmp_path, num_workers=2, WORKER_SESSION_STORE_URL=store.url) as cluster:
        url, seq = cluster.gateway_url, f"outage-{uuid.uuid4().hex[:6]}"
        first = generate(url, prompt="Kept across an outage. ", seq_id=seq, max_tokens=5, temperature=0)
        assert_well_formed(first)
        store.stop()
        for body in ({"seq_id": seq}, {}):  # a known sequence is never continued without history
            down = generate(url, prompt=" during", max_tokens=3, **body)
            assert down.status == 503, down.events
            assert down.events[0]["error"]["type"] == "session_store_unavailable"
        store.start()  # same port and data directory: its append-only file is read back
        after = generate(url, prompt=" after", seq_id=seq, max_tokens=3, temperature=0)
        assert_well_formed(after)
        assert after.start["context_tokens"] == context_after(first) + len(" after")
        assert after.start["cached_tokens"] == context_after(first)
