"""The session store's guarantees, on both backends: SQLite files and a real redis-server."""

import sqlite3
import threading
import time
import uuid

import pytest
import redis

from services.localcluster import free_port
from services.worker.session_store import (TURN_LOG_SIZE, DuplicateTurn, RedisSessionStore, SqliteSessionStore,
                                           StoreUnavailable, TurnBusy, TurnConflict, TurnEntry, describe_store,
                                           open_session_store)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path):
    """(store factory(ttl_s, lease_s), a way to let `seconds` pass: the sqlite clock, or a sleep)."""
    if request.param == "sqlite":
        clock, path = Clock(), tmp_path / "s.db"

        def advance(seconds: float) -> None:
            clock.now += seconds

        return (lambda ttl_s=3600.0, lease_s=30.0: SqliteSessionStore(path, ttl_s, lease_s, clock)), advance
    url = request.getfixturevalue("redis_url")
    return (lambda ttl_s=3600.0, lease_s=30.0: open_session_store(url, ttl_s=ttl_s, lease_s=lease_s)), time.sleep


def seq() -> str:
    """A fresh seq_id: tests share one redis-server."""
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
    assert store.begin_turn(s, "t2", 5, [4, 2**32 - 1]) == [1, 2, 3, 7, 8, 4, 2**32 - 1]


def test_concurrent_writers_cannot_interleave_or_lose_a_turn(backend):
    store = backend[0]()
    s = seq()
    store.begin_turn(s, "t1", 0, [1])
    with pytest.raises(TurnBusy) as busy:
        store.begin_turn(s, "t2", 1, [2])  # another request while t1's answer is pending
    assert "t1" not in str(busy.value)  # another request's turn id is not told (it reaches clients as a 409)
    with pytest.raises(TurnConflict):
        store.end_turn(s, "t1", 5, [9])  # wrong expected length
    with pytest.raises(TurnConflict):
        store.end_turn(s, "t2", 1, [9])  # not the open turn
    store.end_turn(s, "t1", 1, [9])
    with pytest.raises(TurnConflict) as stale:
        store.begin_turn(s, "t3", 1, [2])  # stale: the history has 2 tokens now
    assert not isinstance(stale.value, TurnBusy) and "2 tokens, expected 1" in str(stale.value)
    with pytest.raises(TurnConflict):
        store.end_turn(s, "t1", 2, [9])  # its turn is closed already
    assert store.load(s).token_ids == [1, 9]


def test_the_turn_log_records_each_turn_and_a_repeated_id_never_appends(backend):
    store = backend[0]()
    s = seq()
    store.begin_turn(s, "t1", 0, [1, 2])
    with pytest.raises(DuplicateTurn) as running:
        store.begin_turn(s, "t1", 2, [1, 2])  # the same request again, while it runs
    assert running.value.entry == TurnEntry("t1", 0, 2)
    store.end_turn(s, "t1", 2, [7, 8, 9], finish="length")
    with pytest.raises(DuplicateTurn) as done:
        store.begin_turn(s, "t1", 5, [1, 2])  # and after it closed
    assert done.value.entry == TurnEntry("t1", 0, 2, 3, "length")
    store.begin_turn(s, "t/2", 5, [3])
    session = store.load(s)
    assert session.token_ids == [1, 2, 7, 8, 9, 3]
    assert session.turns == (TurnEntry("t1", 0, 2, 3, "length"), TurnEntry("t/2", 5, 1))
    assert [session.turn_state(e) for e in session.turns] == ["completed", "running"]


def test_a_rolled_back_turn_leaves_the_log_and_may_run_again(backend):
    store = backend[0]()
    s = seq()
    store.begin_turn(s, "t1", 0, [1, 2])
    store.end_turn(s, "t1", 2, [5])
    store.begin_turn(s, "t2", 3, [3, 4])
    store.end_turn(s, "t2", 5, [], keep_len=3)  # cut back to before its prompt
    assert store.load(s).turns == (TurnEntry("t1", 0, 2, 1, ""),)
    assert store.begin_turn(s, "t2", 3, [3, 4]) == [1, 2, 5, 3, 4]
    store.end_turn(s, "t2", 5, [], keep_len=3)
    store.begin_turn(s, "t3", 3, [6])
    store.end_turn(s, "t3", 4, [], keep_len=3)
    assert [e.turn_id for e in store.load(s).turns] == ["t1"]


def test_a_taken_over_turn_keeps_its_place_in_the_log(backend):
    store, advance = backend[0](lease_s=1.0), backend[1]
    s = seq()
    store.begin_turn(s, "t1", 0, [1, 2])
    store.end_turn(s, "t1", 2, [5])
    store.begin_turn(s, "a", 3, [3, 4])        # its worker dies after sending 1 token
    advance(1.2)
    store.begin_turn(s, "a", 5, [9], take_over="a", keep_len=5)  # the gateway's migration
    store.end_turn(s, "a", 6, [10], finish="stop")
    assert store.load(s).turns[-1] == TurnEntry("a", 3, 2, 2, "stop")
    store.begin_turn(s, "b", 7, [], take_over="a", keep_len=6)  # a take-over under a new id
    store.end_turn(s, "b", 6, [11], finish="stop")
    assert store.load(s).turns == (TurnEntry("t1", 0, 2, 1, ""), TurnEntry("b", 3, 2, 2, "stop"))


def test_the_log_keeps_the_last_turns(backend):
    store = backend[0]()
    s = seq()
    for i in range(TURN_LOG_SIZE + 3):
        store.begin_turn(s, f"t{i}", 2 * i, [i])
        store.end_turn(s, f"t{i}", 2 * i + 1, [i])
    turns = store.load(s).turns
    assert len(turns) == TURN_LOG_SIZE and turns[0].turn_id == "t3" and turns[-1].start == 2 * (TURN_LOG_SIZE + 2)


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
    # A migration presents the broken turn's id: it continues it at once.
    assert store.begin_turn(s, "mig", 2, [5], take_over="dead") == [1, 2, 5]
    with pytest.raises(TurnConflict):
        store.end_turn(s, "dead", 3, [9])  # the old attempt lost its turn
    assert store.renew_turn(s, "mig") and not store.renew_turn(s, "dead") and not store.renew_turn(seq(), "mig")
    advance(0.5)
    assert store.load(s).turn_expired
    assert store.begin_turn(s, "later", 3, [6]) == [1, 2, 5, 6]  # lease ran out: free again


def test_the_holder_may_still_end_its_expired_turn(backend):
    make, advance = backend
    store = make(lease_s=0.3)
    s = seq()
    store.begin_turn(s, "slow", 0, [1])
    advance(0.5)
    assert store.load(s).turn_expired
    assert store.end_turn(s, "slow", 1, [2]) == [1, 2]


def test_renewing_keeps_the_turn(backend):
    make, advance = backend
    store = make(lease_s=0.6)
    s = seq()
    store.begin_turn(s, "t", 0, [1])
    advance(0.4)
    assert store.renew_turn(s, "t")
    advance(0.4)
    assert not store.load(s).turn_expired
    with pytest.raises(TurnBusy):
        store.begin_turn(s, "u", 1, [2])


def test_keep_len_cuts_the_history_before_appending(backend):
    store = backend[0]()
    s = seq()
    store.begin_turn(s, "t1", 0, [1, 2, 3])
    assert store.end_turn(s, "t1", 3, [4, 5, 6]) == [1, 2, 3, 4, 5, 6]
    # A retry that regenerates the last answer: keep the first 3 tokens, append a new prompt.
    assert store.begin_turn(s, "t2", 6, [7], keep_len=3) == [1, 2, 3, 7]
    # A migrated turn resumes from a shorter prefix than the broken worker wrote.
    assert store.begin_turn(s, "t3", 4, [], take_over="t2", keep_len=2) == [1, 2]
    assert store.end_turn(s, "t3", 2, [8], keep_len=1) == [1, 8]
    assert store.load(s).token_ids == [1, 8]


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
    assert store.load(s) is None
    assert store.begin_turn(s, "u", 0, [3]) == [3]  # an expired record counts as empty


def test_purge_expired_removes_only_idle_sqlite_rows(tmp_path):
    clock = Clock()
    store = SqliteSessionStore(tmp_path / "s.db", 10, 30, clock)
    store.begin_turn("old", "t", 0, [1])
    clock.now += 8
    store.begin_turn("new", "t", 0, [2])
    clock.now += 5
    assert store.purge_expired() == 1 and store.purge_expired() == 0
    assert store.load("old") is None and store.load("new").token_ids == [2]
    with sqlite3.connect(tmp_path / "s.db") as raw:
        assert [row[0] for row in raw.execute("SELECT seq_id FROM sessions")] == ["new"]


def test_redis_keys_expire_by_themselves(redis_url):
    store = open_session_store(redis_url, ttl_s=60, lease_s=30)
    s = seq()
    store.begin_turn(s, "t", 0, [1])
    ttl_ms = redis.Redis.from_url(redis_url).pttl(f"kvcache:session:{s}")
    assert 0 < ttl_ms <= 60_000 and store.purge_expired() == 0


def test_two_sqlite_stores_on_one_file_share_sessions(tmp_path):
    a = SqliteSessionStore(tmp_path / "shared.db", 3600, 30)
    b = SqliteSessionStore(tmp_path / "shared.db", 3600, 30)
    a.begin_turn("x", "t", 0, [1, 2])
    with pytest.raises(TurnBusy):
        b.begin_turn("x", "u", 2, [3])
    a.end_turn("x", "t", 2, [3])
    assert b.load("x").token_ids == [1, 2, 3]


def test_stores_opened_at_once_on_a_new_file_all_open(tmp_path):
    """Workers that start together create the file together (failed 1 round in 10 before the
    retry: SQLite's busy timeout does not cover the switch to WAL)."""
    for round_ in range(100):
        path, failures = tmp_path / f"new-{round_}.db", []
        start = threading.Barrier(3)

        def open_store() -> None:
            start.wait()
            try:
                SqliteSessionStore(path, 3600, 30)
            except StoreUnavailable as exc:
                failures.append(str(exc))

        threads = [threading.Thread(target=open_store) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == [], f"round {round_}"


def test_racing_sqlite_connections_one_wins(tmp_path):
    """Separate connections on one file lock each other as separate processes do."""
    stores = [SqliteSessionStore(tmp_path / "shared.db", 3600, 30) for _ in range(4)]
    outcomes = []

    def race(i: int) -> None:
        for round_ in range(20):
            try:
                stores[i].begin_turn(f"r{round_}", f"t{i}", 0, [i])
                outcomes.append(round_)
            except TurnConflict:
                pass

    threads = [threading.Thread(target=race, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == list(range(20))  # every round: exactly one winner


def test_a_locked_sqlite_file_is_unavailable(tmp_path):
    store = SqliteSessionStore(tmp_path / "s.db", 3600, 30, busy_timeout_s=0.1)
    blocker = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable):
        store.begin_turn("x", "t", 0, [1])
    blocker.execute("ROLLBACK")
    assert store.begin_turn("x", "t", 0, [1]) == [1]


def test_unreachable_redis_is_unavailable_fast():
    store = open_session_store(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, lease_s=30)
    started = time.monotonic()
    for call in (lambda: store.load("x"), lambda: store.begin_turn("x", "t", 0, [1])):
        with pytest.raises(StoreUnavailable):
            call()
    assert time.monotonic() - started < 2.0


def test_a_redis_error_that_is_not_a_turn_is_unavailable(redis_url):
    s = seq()
    redis.Redis.from_url(redis_url).set(f"kvcache:session:{s}", "not a hash")
    with pytest.raises(StoreUnavailable):
        open_session_store(redis_url, ttl_s=60, lease_s=30).begin_turn(s, "t", 0, [1])


def test_a_file_from_before_the_turn_log_gets_the_column(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE sessions (seq_id TEXT PRIMARY KEY, tokens BLOB NOT NULL, turn_id TEXT, "
               "lease_until REAL NOT NULL, expires_at REAL NOT NULL)")
    db.execute("INSERT INTO sessions VALUES ('s', X'01000000', NULL, 0, 1e12)")
    db.commit()
    db.close()
    store = SqliteSessionStore(path, 3600.0, 30.0)
    assert store.load("s").token_ids == [1] and store.load("s").turns == ()
    store.begin_turn("s", "t1", 1, [2])
    assert store.load("s").turns == (TurnEntry("t1", 1, 1),)


def test_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    relative = open_session_store("sqlite:///rel/s.db", ttl_s=1, lease_s=1)
    assert isinstance(relative, SqliteSessionStore) and (tmp_path / "rel" / "s.db").exists()
    open_session_store(f"sqlite:///{tmp_path}/abs/s.db", ttl_s=1, lease_s=1)
    assert (tmp_path / "abs" / "s.db").exists()
    open_session_store("sqlite:///~/sessions/s.db", ttl_s=1, lease_s=1)
    assert (tmp_path / "home" / "sessions" / "s.db").exists()
    remote = open_session_store("redis://:hunter2@127.0.0.1:6379/2", ttl_s=1, lease_s=1)
    assert isinstance(remote, RedisSessionStore) and remote._redis.get_connection_kwargs()["password"] == "hunter2"
    for bad in ("postgres://h/db", "sqlite:///", "sqlite://s.db", "s.db"):
        with pytest.raises(ValueError, match="sqlite:///relative/path.db"):
            open_session_store(bad, ttl_s=1, lease_s=1)


def test_describe_store_hides_passwords():
    assert describe_store("redis://:hunter2@redis:6379/0") == "redis://:***@redis:6379/0"
    assert describe_store("rediss://kv:hunter2@redis:6380/1") == "rediss://kv:***@redis:6380/1"
    assert describe_store("redis://redis:6379/0?password=hunter2") == "redis://redis:6379/0?password=***"
    assert describe_store("redis://redis:6379/0") == "redis://redis:6379/0"
    assert describe_store("sqlite:///data/s.db") == "sqlite:///data/s.db"
    with pytest.raises(ValueError) as bad:
        open_session_store("mysql://root:hunter2@db/x", ttl_s=1, lease_s=1)
    assert "hunter2" not in str(bad.value)
