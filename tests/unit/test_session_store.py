"""The session store's guarantees, on both backends: SQLite files and a real redis-server."""

import threading
import time
import uuid

import pytest

from services.localcluster import free_port
from services.worker.session_store import (SqliteSessionStore, StoreUnavailable, TurnBusy, TurnConflict,
                                           describe_store, open_session_store)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """(store factory(ttl_s, lease_s), a way to let `seconds` pass)."""
    if request.param == "sqlite":
        clock, path = Clock(), tmp_path / "s.db"

        def advance(seconds: float) -> None:
            clock.now += seconds

        return (lambda ttl_s=3600.0, lease_s=30.0: SqliteSessionStore(path, ttl_s, lease_s, clock)), advance
    url = request.getfixturevalue("redis_url")
    return (lambda ttl_s=3600.0, lease_s=30.0: open_session_store(url, ttl_s=ttl_s, lease_s=lease_s)), time.sleep


def seq() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def test_a_turn_appends_the_prompt_then_the_answer(backend):
    store = backend[0]()
    s = seq()
    assert store.load(s) is None
    assert store.begin_turn(s, "t1", 0, [1, 2, 3]) == [1, 2, 3]
    session = store.load(s)
    assert session.token_ids == [1, 2, 3] and session.turn_id == "t1" and not session.turn_expired
    assert store.end_turn(s, "t1", 3, [7, 8]) == [1, 2, 3, 7, 8]
    assert store.load(s).turn_id is None
    assert store.begin_turn(s, "t2", 5, [4]) == [1, 2, 3, 7, 8, 4]


def test_concurrent_writers_cannot_interleave_or_lose_a_turn(backend):
    store = backend[0]()
    s = seq()
    store.begin_turn(s, "t1", 0, [1])
    with pytest.raises(TurnBusy):
        store.begin_turn(s, "t2", 1, [2])  # another request while t1's answer is pending
    with pytest.raises(TurnConflict):
        store.end_turn(s, "t1", 5, [9])  # wrong expected length
    store.end_turn(s, "t1", 1, [9])
    with pytest.raises(TurnConflict):
        store.begin_turn(s, "t3", 1, [2])  # stale: the history has 2 tokens now
    assert store.load(s).token_ids == [1, 9]


def test_racing_threads_one_wins(backend):
    store = backend[0]()
    s = seq()
    outcomes = []

    def race(i: int) -> None:
        try:
            store.begin_turn(s, f"t{i}", 0, [i])
            outcomes.append("won")
        except TurnConflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost"] * 7 + ["won"]
    assert len(store.load(s).token_ids) == 1


def test_a_dead_turn_is_released_by_its_lease_and_can_be_taken_over(backend):
    make, advance = backend
    store = make(lease_s=0.3)
    s = seq()
    store.begin_turn(s, "dead", 0, [1, 2])
    with pytest.raises(TurnBusy):
        store.begin_turn(s, "new", 2, [3])
    # A migration presents the broken turn's id: it continues it at once, cutting extra tokens.
    assert store.begin_turn(s, "mig", 2, [5], take_over="dead", keep_len=2) == [1, 2, 5]
    with pytest.raises(TurnConflict):
        store.end_turn(s, "dead", 3, [9])  # the old attempt lost its turn
    assert store.renew_turn(s, "mig") and not store.renew_turn(s, "dead")
    advance(0.5)
    assert store.load(s).turn_expired
    assert store.begin_turn(s, "later", 3, [6]) == [1, 2, 5, 6]  # lease ran out: free again


def test_ending_with_nothing_left_deletes_and_delete_respects_turns(backend):
    store = backend[0]()
    s = seq()
    store.begin_turn(s, "t", 0, [1, 2])
    with pytest.raises(TurnBusy):
        store.delete(s)
    assert store.end_turn(s, "t", 2, [], keep_len=0) == []  # a refused first turn rolls back
    assert store.load(s) is None
    store.begin_turn(s, "t2", 0, [3])
    store.end_turn(s, "t2", 1, [4])
    assert store.delete(s) is True and store.delete(s) is False and store.load(s) is None


def test_idle_sessions_expire(backend):
    make, advance = backend
    store = make(ttl_s=0.5)
    s = seq()
    store.begin_turn(s, "t", 0, [1])
    store.end_turn(s, "t", 1, [2])
    advance(0.8)
    store.purge_expired()
    assert store.load(s) is None


def test_two_sqlite_stores_on_one_file_share_sessions(tmp_path):
    a = SqliteSessionStore(tmp_path / "shared.db", 3600, 30)
    b = SqliteSessionStore(tmp_path / "shared.db", 3600, 30)
    a.begin_turn("x", "t", 0, [1, 2])
    with pytest.raises(TurnBusy):
        b.begin_turn("x", "u", 2, [3])
    a.end_turn("x", "t", 2, [3])
    assert b.load("x").token_ids == [1, 2, 3]


def test_unreachable_redis_is_unavailable_fast():
    store = open_session_store(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, lease_s=30)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.load("x")
    assert time.monotonic() - started < 2.0


def test_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = open_session_store("sqlite:///rel/s.db", ttl_s=1, lease_s=1)
    assert isinstance(relative, SqliteSessionStore) and (tmp_path / "rel" / "s.db").exists()
    open_session_store(f"sqlite:///{tmp_path}/abs/s.db", ttl_s=1, lease_s=1)
    assert (tmp_path / "abs" / "s.db").exists()
    with pytest.raises(ValueError, match="sqlite:///PATH or redis://"):
        open_session_store("postgres://h/db", ttl_s=1, lease_s=1)
    assert describe_store("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert describe_store("redis://redis:6379/0") == "redis://redis:6379/0"
