"""The session store: the source of truth for each sequence's token ids (a worker's KV is only a
cache of them). Two backends behind one interface, chosen by URL:

- `sqlite:///PATH` (relative) or `sqlite:////abs/PATH`: one host; WAL mode, so the worker
  processes that name the same file share it safely.
- `redis://[:password@]host:port/db` (or `rediss://`): Docker Compose and Kubernetes.

A sequence's record is its token ids plus at most one open *turn*: the request that is appending
to it (its prompt is in, its answer is not yet). Every write is one atomic compare-and-set on the
length and the turn, so two writers can never interleave their turns or lose one. A turn holds a
lease (renewed by its worker) so that a crashed worker's turn is released.

The record also keeps a log of its last TURN_LOG_SIZE turns (id, where it starts, its prompt and
completion lengths, how it ended): a turn id that is in the log is never appended again
(DuplicateTurn), which makes a retried request exactly-once, and the log is how a client learns a
turn's outcome. Synchronous and thread-safe; no framework imports.
"""

import json
import re
import sqlite3
import sys
import threading
import time
from abc import ABC, abstractmethod
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


TURN_LOG_SIZE = 32


@dataclass(frozen=True)
class TurnEntry:
    """One turn in a sequence's log: history[start:start + prompt_tokens] is its prompt, and the
    next completion_tokens its answer. completion_tokens is None while the turn is open."""

    turn_id: str
    start: int
    prompt_tokens: int
    completion_tokens: int | None = None
    finish: str = ""  # the finish reason it was closed with ("stop", "length", "abort", ...)

    def to_json(self) -> list:
        done = -1 if self.completion_tokens is None else self.completion_tokens
        return [self.turn_id, self.start, self.prompt_tokens, done, self.finish]

    @classmethod
    def from_json(cls, item: list) -> "TurnEntry":
        turn_id, start, prompt, done, finish = item
        return cls(turn_id, start, prompt, None if done < 0 else done, finish)


@dataclass(frozen=True)
class Session:
    token_ids: list[int]
    turn_id: str | None        # the request whose turn is open; None when closed
    turn_expired: bool = False  # its lease ran out (its worker likely died)
    turns: tuple[TurnEntry, ...] = ()

    def entry(self, turn_id: str) -> TurnEntry | None:
        return find_entry(self.turns, turn_id)

    def turn_state(self, entry: TurnEntry) -> str:
        """"completed"; "running" (open, lease live); "interrupted" (open, but its worker's lease
        ran out or another turn began after it: its answer was never stored)."""
        if entry.completion_tokens is not None:
            return "completed"
        return "running" if self.turn_id == entry.turn_id and not self.turn_expired else "interrupted"


class SessionStoreError(Exception):
    pass


class StoreUnavailable(SessionStoreError):
    """The backend is down, unreachable, locked or too slow."""


class TurnConflict(SessionStoreError):
    """A compare-and-set failed: the length or the turn is not what the caller expected."""


class TurnBusy(TurnConflict):
    """Another request's unexpired turn is open."""


class DuplicateTurn(SessionStoreError):
    """The turn id is in the sequence's log: this request ran (or runs) already."""

    def __init__(self, entry: TurnEntry):
        super().__init__(f"turn '{entry.turn_id}' was already sent on this sequence")
        self.entry = entry


def find_entry(log, turn_id: str) -> TurnEntry | None:
    return next((entry for entry in log if entry.turn_id == turn_id), None)


def logged_begin(log: tuple[TurnEntry, ...], turn_id: str, take_over: str | None, start: int,
                 prompt_tokens: int) -> tuple[TurnEntry, ...]:
    """The log after turn_id opens (a taken-over turn keeps its place and prompt)."""
    previous = find_entry(log, take_over) if take_over else None
    previous = previous or find_entry(log, turn_id)
    if previous is not None:
        start, prompt_tokens = previous.start, previous.prompt_tokens
    kept = tuple(e for e in log if e.turn_id not in (turn_id, take_over))
    return (kept + (TurnEntry(turn_id, start, prompt_tokens),))[-TURN_LOG_SIZE:]


def logged_end(log: tuple[TurnEntry, ...], turn_id: str, length: int, finish: str) -> tuple[TurnEntry, ...]:
    """The log after turn_id closes with the history `length` tokens long: a turn cut back to
    before its prompt (a rollback) leaves the log, as if it never ran."""
    out = []
    for entry in log:
        if entry.turn_id != turn_id:
            out.append(entry)
        elif length > entry.start:
            done = max(0, length - entry.start - entry.prompt_tokens)
            out.append(TurnEntry(turn_id, entry.start, entry.prompt_tokens, done, finish))
    return tuple(out)


def dump_log(log: tuple[TurnEntry, ...]) -> str:
    return json.dumps([e.to_json() for e in log], separators=(",", ":"))


def load_log(text: str | bytes | None) -> tuple[TurnEntry, ...]:
    items = json.loads(text or "[]")
    return tuple(TurnEntry.from_json(i) for i in items) if isinstance(items, list) else ()  # {}: Lua's empty table


_UINT32 = "I" if array("I").itemsize == 4 else "L"


def pack(token_ids: list[int]) -> bytes:
    """Little-endian uint32s, whatever the host (the Redis scripts count 4 bytes a token)."""
    data = array(_UINT32, token_ids)
    if sys.byteorder == "big":
        data.byteswap()
    return data.tobytes()


def unpack(data: bytes | None) -> list[int]:
    out = array(_UINT32)
    out.frombytes(data or b"")
    if sys.byteorder == "big":
        out.byteswap()
    return out.tolist()


@dataclass
class Record:
    token_ids: list[int]
    turn_id: str | None
    lease_until: float
    log: tuple[TurnEntry, ...] = ()

    def turn_is_live(self, now: float) -> bool:
        return self.turn_id is not None and self.lease_until > now


EMPTY = Record([], None, 0.0)


def decide_begin(cur: Record, turn_id: str, expected_len: int, token_ids: list[int], take_over: str | None,
                 keep_len: int | None, now: float, lease_s: float) -> Record:
    """The record after a successful begin_turn, or the error (the Redis script mirrors this)."""
    if cur.turn_is_live(now) and cur.turn_id not in (turn_id, take_over):
        raise TurnBusy("sequence is held by another request's turn")  # whose id is not ours to tell
    entry = find_entry(cur.log, turn_id)
    if entry is not None and turn_id != take_over:
        raise DuplicateTurn(entry)
    if len(cur.token_ids) != expected_len:
        raise TurnConflict(f"history has {len(cur.token_ids)} tokens, expected {expected_len}")
    keep = len(cur.token_ids) if keep_len is None else keep_len
    log = logged_begin(cur.log, turn_id, take_over, keep, len(token_ids))
    return Record(cur.token_ids[:keep] + list(token_ids), turn_id, now + lease_s, log)


def decide_end(cur: Record | None, turn_id: str, expected_len: int, token_ids: list[int],
               keep_len: int | None, finish: str) -> Record:
    if cur is None or cur.turn_id != turn_id:
        raise TurnConflict("this request no longer holds the sequence's turn")
    if len(cur.token_ids) != expected_len:
        raise TurnConflict(f"history has {len(cur.token_ids)} tokens, expected {expected_len}")
    keep = len(cur.token_ids) if keep_len is None else keep_len
    token_ids = cur.token_ids[:keep] + list(token_ids)
    return Record(token_ids, None, 0.0, logged_end(cur.log, turn_id, len(token_ids), finish))


class SessionStore(ABC):
    def __init__(self, ttl_s: float, lease_s: float):
        self.ttl_s = ttl_s
        self.lease_s = lease_s

    @abstractmethod
    def load(self, seq_id: str) -> Session | None:
        """None when unknown or expired."""

    @abstractmethod
    def begin_turn(self, seq_id: str, turn_id: str, expected_len: int, token_ids: list[int], *,
                   take_over: str | None = None, keep_len: int | None = None) -> list[int]:
        """Append the prompt and open the turn: TurnBusy if another unexpired turn (neither
        turn_id nor take_over) is open, DuplicateTurn if turn_id is in the log (and is not
        take_over), TurnConflict if the length is not expected_len. Keeps the first keep_len
        tokens (default all) before appending. Returns the new history."""

    @abstractmethod
    def end_turn(self, seq_id: str, turn_id: str, expected_len: int, token_ids: list[int], *,
                 keep_len: int | None = None, finish: str = "") -> list[int]:
        """Append the generated ids and close turn_id: TurnConflict unless turn_id holds the turn
        (lease expired or not) and the length is expected_len. An empty result deletes it. A
        keep_len at or before the turn's start rolls it back (it leaves the log)."""

    @abstractmethod
    def renew_turn(self, seq_id: str, turn_id: str) -> bool:
        """Extend turn_id's lease if it still holds the turn."""

    @abstractmethod
    def delete(self, seq_id: str) -> bool:
        """TurnBusy if an unexpired turn is open; else remove; returns whether it existed."""

    def purge_expired(self) -> int:
        return 0

    def close(self) -> None:
        pass


# --- SQLite --------------------------------------------------------------------------------
_SCHEMA = """CREATE TABLE IF NOT EXISTS sessions (
    seq_id TEXT PRIMARY KEY, tokens BLOB NOT NULL, turn_id TEXT, lease_until REAL NOT NULL,
    expires_at REAL NOT NULL, log TEXT NOT NULL DEFAULT '[]')"""


SQLITE_OPEN_WAIT_S = 10.0


def _open_sqlite(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection in WAL mode with the table created. Workers that start together race to create
    the file and switch it to WAL, and SQLite answers a loser "database is locked" at once, without
    its busy timeout (measured: 1 start in 4 with three openers): so the loser tries again."""
    deadline = time.monotonic() + SQLITE_OPEN_WAIT_S
    while True:
        db = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            _add_log_column(db)
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.02)


def _add_log_column(db: sqlite3.Connection) -> None:
    """A file written before the turn log existed gets the column (its turns have no log)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
    if "log" not in columns:
        db.execute("ALTER TABLE sessions ADD COLUMN log TEXT NOT NULL DEFAULT '[]'")


class SqliteSessionStore(SessionStore):
    def __init__(self, path: Path, ttl_s: float, lease_s: float, clock: Callable[[], float] = time.time,
                 busy_timeout_s: float = 2.0):
        super().__init__(ttl_s, lease_s)
        self.clock = clock
        self._lock = threading.Lock()
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = _open_sqlite(path, busy_timeout_s)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open {path}: {exc}") from exc

    def load(self, seq_id: str) -> Session | None:
        with self._transaction(write=False) as now:
            cur = self._get(seq_id, now)
        if cur is None:
            return None
        return Session(cur.token_ids, cur.turn_id, cur.turn_id is not None and cur.lease_until <= now, cur.log)

    def begin_turn(self, seq_id, turn_id, expected_len, token_ids, *, take_over=None, keep_len=None):
        with self._transaction() as now:
            new = decide_begin(self._get(seq_id, now) or EMPTY, turn_id, expected_len, token_ids,
                               take_over, keep_len, now, self.lease_s)
            self._put(seq_id, new, now)
        return new.token_ids

    def end_turn(self, seq_id, turn_id, expected_len, token_ids, *, keep_len=None, finish=""):
        with self._transaction() as now:
            new = decide_end(self._get(seq_id, now), turn_id, expected_len, token_ids, keep_len, finish)
            self._put(seq_id, new, now)
        return new.token_ids

    def renew_turn(self, seq_id: str, turn_id: str) -> bool:
        with self._transaction() as now:
            cursor = self._db.execute(
                "UPDATE sessions SET lease_until = ?, expires_at = ? WHERE seq_id = ? AND turn_id = ? "
                "AND expires_at > ?", (now + self.lease_s, now + self.ttl_s, seq_id, turn_id, now))
        return cursor.rowcount > 0

    def delete(self, seq_id: str) -> bool:
        with self._transaction() as now:
            cur = self._get(seq_id, now)
            if cur is not None and cur.turn_is_live(now):
                raise TurnBusy("sequence has a turn in progress")
            self._db.execute("DELETE FROM sessions WHERE seq_id = ?", (seq_id,))
        return cur is not None

    def purge_expired(self) -> int:
        with self._transaction() as now:
            return self._db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _get(self, seq_id: str, now: float) -> Record | None:
        row = self._db.execute("SELECT tokens, turn_id, lease_until, log FROM sessions WHERE seq_id = ? "
                               "AND expires_at > ?", (seq_id, now)).fetchone()
        return Record(unpack(row[0]), row[1], row[2], load_log(row[3])) if row else None

    def _put(self, seq_id: str, record: Record, now: float) -> None:
        if not record.token_ids and record.turn_id is None:
            self._db.execute("DELETE FROM sessions WHERE seq_id = ?", (seq_id,))
            return
        self._db.execute("INSERT OR REPLACE INTO sessions (seq_id, tokens, turn_id, lease_until, expires_at, log) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (seq_id, pack(record.token_ids), record.turn_id,
                                                       record.lease_until, now + self.ttl_s, dump_log(record.log)))

    def _transaction(self, write: bool = True):
        return _SqliteTransaction(self, write)


class _SqliteTransaction:
    """`with` block: the store's lock, BEGIN IMMEDIATE (a write lock across processes) or a read,
    COMMIT or ROLLBACK; sqlite errors become StoreUnavailable. Yields the clock's now."""

    def __init__(self, store: SqliteSessionStore, write: bool):
        self.store, self.write = store, write

    def __enter__(self) -> float:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        except sqlite3.Error as exc:
            self.store._lock.release()
            raise StoreUnavailable(f"sqlite: {exc}") from exc
        return self.store.clock()

    def __exit__(self, exc_type, exc, tb) -> bool:
        db = self.store._db
        try:
            db.execute("ROLLBACK" if exc_type else "COMMIT")
        except sqlite3.Error as commit_exc:
            if exc_type is None:
                raise StoreUnavailable(f"sqlite: {commit_exc}") from commit_exc
        finally:
            self.store._lock.release()
        if exc_type is not None and issubclass(exc_type, sqlite3.Error):
            raise StoreUnavailable(f"sqlite: {exc}") from exc
        return False


# --- Redis ---------------------------------------------------------------------------------
# KEYS[1] = the session hash {t: packed tokens, turn: id or "", lease: ms, log: JSON turn log}.
# Mirrors decide_begin / decide_end (and logged_begin / logged_end); lengths are in tokens (4 bytes
# each). Returns the new packed tokens, or an error.
_FIND = """
local function find(log, id)
  for i, e in ipairs(log) do if e[1] == id then return i end end
  return nil
end
"""
_BEGIN = _FIND + """
local now = redis.call('TIME'); now = now[1] * 1000 + math.floor(now[2] / 1000)
local cur = redis.call('HMGET', KEYS[1], 't', 'turn', 'lease', 'log')
local t, turn, lease = cur[1] or '', cur[2] or '', tonumber(cur[3] or '0')
local log = cjson.decode(cur[4] or '[]')
if turn ~= '' and lease > now and turn ~= ARGV[1] and turn ~= ARGV[2] then
  return redis.error_reply("KVCACHE_BUSY sequence is held by another request's turn") end
local mine = find(log, ARGV[1])
if mine and ARGV[1] ~= ARGV[2] then
  return redis.error_reply('KVCACHE_DUPLICATE ' .. cjson.encode(log[mine])) end
if #t / 4 ~= tonumber(ARGV[3]) then
  return redis.error_reply('KVCACHE_CONFLICT history has ' .. (#t / 4) .. ' tokens, expected ' .. ARGV[3]) end
local keep = tonumber(ARGV[5]); if keep < 0 then keep = #t / 4 end
local start, prompt = keep, #ARGV[4] / 4
local prev = (ARGV[2] ~= '' and find(log, ARGV[2])) or mine
if prev then start, prompt = log[prev][2], log[prev][3] end
local out = {}
for _, e in ipairs(log) do if e[1] ~= ARGV[1] and e[1] ~= ARGV[2] then out[#out + 1] = e end end
out[#out + 1] = {ARGV[1], start, prompt, -1, ''}
while #out > tonumber(ARGV[8]) do table.remove(out, 1) end
t = string.sub(t, 1, keep * 4) .. ARGV[4]
redis.call('HSET', KEYS[1], 't', t, 'turn', ARGV[1], 'lease', now + tonumber(ARGV[6]), 'log', cjson.encode(out))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return t
"""
_END = """
local cur = redis.call('HMGET', KEYS[1], 't', 'turn', 'log')
local t, turn = cur[1], cur[2] or ''
if not t or turn == '' or turn ~= ARGV[1] then
  return redis.error_reply("KVCACHE_CONFLICT this request no longer holds the sequence's turn") end
if #t / 4 ~= tonumber(ARGV[2]) then
  return redis.error_reply('KVCACHE_CONFLICT history has ' .. (#t / 4) .. ' tokens, expected ' .. ARGV[2]) end
local keep = tonumber(ARGV[4]); if keep < 0 then keep = #t / 4 end
t = string.sub(t, 1, keep * 4) .. ARGV[3]
if #t == 0 then redis.call('DEL', KEYS[1]) return t end
local n, out = #t / 4, {}
for _, e in ipairs(cjson.decode(cur[3] or '[]')) do
  if e[1] ~= ARGV[1] then out[#out + 1] = e
  elseif n > e[2] then out[#out + 1] = {e[1], e[2], e[3], math.max(0, n - e[2] - e[3]), ARGV[6]} end
end
redis.call('HSET', KEYS[1], 't', t, 'turn', '', 'lease', 0, 'log', cjson.encode(out))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return t
"""
_RENEW = """
local now = redis.call('TIME'); now = now[1] * 1000 + math.floor(now[2] / 1000)
local turn = redis.call('HGET', KEYS[1], 'turn')
if not turn or turn == '' or turn ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'lease', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
_DELETE = """
local now = redis.call('TIME'); now = now[1] * 1000 + math.floor(now[2] / 1000)
local cur = redis.call('HMGET', KEYS[1], 'turn', 'lease')
if cur[1] and cur[1] ~= '' and tonumber(cur[2] or '0') > now then
  return redis.error_reply('KVCACHE_BUSY sequence has a turn in progress') end
return redis.call('DEL', KEYS[1])
"""
_LOAD = """
local now = redis.call('TIME'); now = now[1] * 1000 + math.floor(now[2] / 1000)
local cur = redis.call('HMGET', KEYS[1], 't', 'turn', 'lease', 'log')
return {cur[1] or false, cur[2] or '', (cur[3] and tonumber(cur[3]) <= now) and 1 or 0, cur[4] or '[]'}
"""


class RedisSessionStore(SessionStore):
    def __init__(self, url: str, ttl_s: float, lease_s: float):
        super().__init__(ttl_s, lease_s)
        # No automatic retries: a write that timed out may have run, and its retry would conflict.
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2,
                                           retry=Retry(NoBackoff(), 0))
        self._scripts = {name: self._redis.register_script(src) for name, src in
                         (("begin", _BEGIN), ("end", _END), ("renew", _RENEW), ("delete", _DELETE),
                          ("load", _LOAD))}

    def load(self, seq_id: str) -> Session | None:
        data, turn, expired, log = self._run("load", seq_id)
        if data is None or data is False:
            return None
        turn_id = turn.decode() or None
        return Session(unpack(data), turn_id, bool(turn_id and expired), load_log(log))

    def begin_turn(self, seq_id, turn_id, expected_len, token_ids, *, take_over=None, keep_len=None):
        return unpack(self._run("begin", seq_id, turn_id, take_over or "", expected_len, pack(token_ids),
                                -1 if keep_len is None else keep_len, int(self.lease_s * 1000),
                                int(self.ttl_s * 1000), TURN_LOG_SIZE))

    def end_turn(self, seq_id, turn_id, expected_len, token_ids, *, keep_len=None, finish=""):
        return unpack(self._run("end", seq_id, turn_id, expected_len, pack(token_ids),
                                -1 if keep_len is None else keep_len, int(self.ttl_s * 1000), finish))

    def renew_turn(self, seq_id: str, turn_id: str) -> bool:
        return bool(self._run("renew", seq_id, turn_id, int(self.lease_s * 1000), int(self.ttl_s * 1000)))

    def delete(self, seq_id: str) -> bool:
        return bool(self._run("delete", seq_id))

    def close(self) -> None:
        self._redis.close()

    def _run(self, script: str, seq_id: str, *args):
        try:
            return self._scripts[script](keys=[f"kvcache:session:{seq_id}"], args=list(args))
        except redis.ResponseError as exc:
            kind, _, message = str(exc).partition(" ")
            if kind == "KVCACHE_BUSY":
                raise TurnBusy(message) from None
            if kind == "KVCACHE_CONFLICT":
                raise TurnConflict(message) from None
            if kind == "KVCACHE_DUPLICATE":
                raise DuplicateTurn(TurnEntry.from_json(json.loads(message))) from None
            raise StoreUnavailable(f"redis: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc


# --- choosing one --------------------------------------------------------------------------
_URL_FORMS = "sqlite:///relative/path.db, sqlite:////abs/path.db or redis[s]://[:password@]host:port/db"


def open_session_store(url: str, *, ttl_s: float, lease_s: float) -> SessionStore:
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return SqliteSessionStore(Path(url[len("sqlite:///"):]).expanduser(), ttl_s, lease_s)
    if url.startswith(("redis://", "rediss://")):
        return RedisSessionStore(url, ttl_s, lease_s)
    raise ValueError(f"session store URL must be {_URL_FORMS}, got {describe_store(url)!r}")


def describe_store(url: str) -> str:
    """The URL with any password (in the authority or a ?password= query) replaced by ***, for logs."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # urlunsplit would not give back every URL unchanged (sqlite:///)
    return urlunsplit(parts._replace(netloc=netloc, query=query))
