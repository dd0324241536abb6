"""KV store: in-place appends, geometric growth, a byte budget that always holds, LRU eviction
of whole idle sequences (keeping their token ids), and refusal paths."""

import math
import weakref

import pytest
import torch

from services.worker.kv import store as kv_store
from services.worker.kv.store import (BLOCK_TOKENS, STATELESS_KEY_PREFIX, KVCapacityError, KVLayout, KVStore,
                                      SequenceKV)

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32,
                  device=torch.device("cpu"), max_positions=4096)
BPT = LAYOUT.bytes_per_token  # 2 layers x (k, v) x 2 heads x 4 dims x 4 bytes = 128


def tokens_bytes(n: int) -> int:
    return n * BPT


def make_store(budget_tokens: int, **kwargs) -> KVStore:
    return KVStore(LAYOUT, tokens_bytes(budget_tokens), **kwargs)


def append_token(store: KVStore, entry, value: float) -> None:
    """What the engine does per token: reserve room, write K/V at the next position."""
    pos = entry.kv.num_tokens if entry.kv else 0
    store.reserve(entry, pos + 1)
    kv = entry.kv
    for layer in range(LAYOUT.num_layers):
        k = torch.full((1, LAYOUT.num_kv_heads, LAYOUT.head_dim), value + layer)
        kv.write(layer, pos, k, -k)
    kv.num_tokens = pos + 1
    entry.token_ids.append(int(value))


def filled(store: KVStore, seq_id: str, num_tokens: int, *, busy: bool = False):
    entry = store.get_or_create(seq_id)
    store.reserve(entry, num_tokens)
    entry.token_ids = list(range(num_tokens))
    entry.kv.num_tokens = num_tokens
    entry.busy = busy
    return entry


def assert_accounting(store: KVStore) -> None:
    live = sum(e.kv.nbytes for e in store.entries.values() if e.kv is not None)
    assert store.used_bytes == live
    assert store.used_bytes <= store.budget_bytes
    assert store.peak_bytes <= store.budget_bytes


def test_bytes_per_token():
    assert BPT == 2 * 2 * 2 * 4 * 4


def test_write_returns_views_over_the_valid_prefix():
    kv = SequenceKV(LAYOUT, 8)
    k = torch.randn(3, 2, 4)
    keys, values = kv.write(1, 0, k, 2 * k)
    assert keys.shape == (3, 2, 4) and torch.equal(keys, k) and torch.equal(values, 2 * k)
    assert keys.data_ptr() == kv.data[1, 0].data_ptr()  # a view of the buffer, not a copy
    more = torch.randn(2, 2, 4)
    keys, _ = kv.write(1, 3, more, more)
    assert torch.equal(keys, torch.cat([k, more]))


def test_grow_keeps_valid_kv():
    store = make_store(10_000)
    entry = store.get_or_create("s")
    for i in range(10):
        append_token(store, entry, float(i))
    before = entry.kv.data[:, :, :, :10].clone()
    old_capacity = entry.kv.capacity
    store.reserve(entry, 500)
    assert entry.kv.capacity >= 500 > old_capacity
    assert entry.kv.num_tokens == 10 and entry.num_cached == 10
    assert torch.equal(entry.kv.data[:, :, :, :10], before)
    assert_accounting(store)


def test_append_within_capacity_is_in_place():
    store = make_store(10_000)
    entry = store.get_or_create("s")
    store.reserve(entry, 1)
    kv, ptr = entry.kv, entry.kv.data.data_ptr()
    assert kv.capacity == BLOCK_TOKENS
    for i in range(BLOCK_TOKENS):
        append_token(store, entry, float(i))
        assert entry.kv is kv and kv.data.data_ptr() == ptr
    assert kv.num_tokens == BLOCK_TOKENS


def test_capacity_grows_geometrically():
    store = make_store(10_000)
    entry = store.get_or_create("s")
    buffers = []
    for i in range(1000):
        append_token(store, entry, float(i))
        if not buffers or entry.kv is not buffers[-1]:
            buffers.append(entry.kv)
    # 64, 128, 256, 512, 1024: O(log n) reallocations, so appending is amortized O(1).
    assert len(buffers) <= math.ceil(math.log2(1000 / BLOCK_TOKENS)) + 1
    assert [b.capacity for b in buffers] == sorted({b.capacity for b in buffers})
    # Every token written along the way survived the copies.
    expected = torch.arange(1000, dtype=torch.float32)
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(entry.kv.data[layer, 0, 0, :1000, 0], expected + layer)
        assert torch.equal(entry.kv.data[layer, 1, 0, :1000, 0], -(expected + layer))
    assert_accounting(store)


def test_reserve_past_the_window_is_refused():
    store = make_store(100_000)
    with pytest.raises(ValueError):
        store.reserve(store.get_or_create("s"), LAYOUT.max_positions + 1)


class _LiveBuffers:
    """Every SequenceKV the store allocates, tracked while alive: checks real simultaneous
    allocation against the budget, independently of the store's own accounting."""

    def __init__(self, budget: int):
        self.budget = budget
        self.live: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0

    def factory(self):
        tracker = self

        class Tracked(SequenceKV):
            def __init__(self, layout, capacity):
                super().__init__(layout, capacity)
                tracker.live.add(self)
                total = sum(b.nbytes for b in tracker.live)
                tracker.peak = max(tracker.peak, total)
                assert total <= tracker.budget, f"{total} bytes live > budget {tracker.budget}"

        return Tracked


def test_budget_holds_at_every_step_including_grows(monkeypatch):
    budget_tokens = 3 * 256
    tracker = _LiveBuffers(tokens_bytes(budget_tokens))
    monkeypatch.setattr(kv_store, "SequenceKV", tracker.factory())
    store = make_store(budget_tokens)
    # Five sequences appended in an interleaved order, one token at a time, to 300 tokens each:
    # each grow must count the old and the new buffer together.
    for step in range(300):
        for s in range(5):
            entry = store.get_or_create(f"s{s}")
            entry.busy = True
            append_token(store, entry, float(step))
            entry.busy = False
            assert store.used_bytes <= store.budget_bytes
        assert_accounting(store)
    assert store.evictions > 0
    assert tracker.peak <= store.budget_bytes
    assert store.peak_bytes <= store.budget_bytes


def test_grow_that_cannot_hold_old_and_new_drops_own_kv():
    store = make_store(160)
    entry = filled(store, "s", 60)
    assert entry.kv.capacity == 64
    store.reserve(entry, 100)  # 64 + 128 > 160: the old buffer goes first, recompute instead
    assert entry.kv.capacity == 128 and entry.num_cached == 0
    assert entry.token_ids == list(range(60))
    assert_accounting(store)


def test_lru_evicts_least_recently_used_idle_sequence_first():
    store = make_store(3 * 64)
    a, b, c = (filled(store, name, 64) for name in "abc")
    store.get_or_create("a")  # touch: b is now the least recently used
    d = filled(store, "d", 64)
    assert b.kv is None and a.kv is not None and c.kv is not None and d.kv is not None
    assert store.evictions == 1
    assert list(store.entries) == ["b", "c", "a", "d"]  # LRU order; b stays known, without KV
    e = filled(store, "e", 64)
    assert c.kv is None and a.kv is not None and e.kv is not None
    assert store.evictions == 2
    assert_accounting(store)


def test_eviction_removes_whole_kv_and_keeps_token_ids():
    store = make_store(2 * 64)
    a = filled(store, "a", 50)
    filled(store, "b", 64)
    used_before = store.used_bytes
    a_bytes = a.kv.nbytes
    filled(store, "c", 64)
    assert a.kv is None and a.num_cached == 0  # every layer gone at once
    assert a.token_ids == list(range(50))
    assert store.get("a") is a  # the sequence is still known, to be recomputed
    assert store.used_bytes == used_before - a_bytes + 64 * BPT
    assert store.stats()["cached_sequences"] == 2
    assert_accounting(store)


def test_busy_sequences_are_never_evicted():
    store = make_store(3 * 64)
    a = filled(store, "a", 64, busy=True)  # oldest, but running
    b = filled(store, "b", 64)
    c = filled(store, "c", 64, busy=True)
    d = filled(store, "d", 64, busy=True)
    assert a.kv is not None and c.kv is not None and b.kv is None
    with pytest.raises(KVCapacityError) as info:
        filled(store, "e", 64)  # only running sequences hold KV now
    assert info.value.ever_fits is True
    assert all(x.kv is not None for x in (a, c, d))
    assert_accounting(store)


def test_capacity_error_ever_fits_false_when_larger_than_budget():
    store = make_store(128)
    entry = store.get_or_create("s")
    with pytest.raises(KVCapacityError) as info:
        store.reserve(entry, 129)
    assert info.value.ever_fits is False
    assert store.used_bytes == 0 and store.peak_bytes == 0


def test_capacity_error_ever_fits_true_when_running_sequences_hold_the_budget():
    store = make_store(2 * 64)
    filled(store, "a", 64, busy=True)
    filled(store, "b", 64, busy=True)
    with pytest.raises(KVCapacityError) as info:
        store.reserve(store.get_or_create("c"), 10)
    assert info.value.ever_fits is True
    assert store.evictions == 0
    assert_accounting(store)


def test_delete():
    store = make_store(4 * 64)
    filled(store, "idle", 64)
    filled(store, "busy", 64, busy=True)
    assert store.delete("busy") is False and store.get("busy") is not None
    assert store.delete("unknown") is False
    assert store.delete("idle") is True and store.get("idle") is None
    assert store.used_bytes == 64 * BPT
    assert_accounting(store)


def test_max_sequences_forgets_oldest_idle_entries():
    store = make_store(100 * 64, max_sequences=3)
    filled(store, "a", 10, busy=True)
    for name in "bcd":
        filled(store, name, 10)
    assert list(store.entries) == ["a", "c", "d"]  # b was the oldest idle one
    store.get_or_create("c")
    filled(store, "e", 10)
    assert set(store.entries) == {"a", "c", "e"}
    assert_accounting(store)


def test_max_sequences_with_every_other_entry_busy_still_creates_the_entry():
    store = make_store(100 * 64, max_sequences=2)
    filled(store, "a", 10, busy=True)
    filled(store, "b", 10, busy=True)
    entry = store.get_or_create("c")  # nothing idle to forget: must not forget the new entry
    assert store.get("c") is entry
    assert store.get("a") is not None and store.get("b") is not None


def test_stats_fields():
    store = make_store(4 * 64)
    filled(store, "a", 10)
    store.get_or_create("b")
    stats = store.stats()
    assert stats == {"sequences": 2, "stateless_sequences": 0, "prefix_indexed_sequences": 0,
                     "cached_sequences": 1, "cached_tokens": 10,
                     "kv_bytes_used": 64 * BPT, "kv_bytes_peak": 64 * BPT,
                     "kv_bytes_limit": 4 * 64 * BPT, "kv_bytes_per_token": BPT, "evictions": 0}


# --- the prefix index, kept by the store -------------------------------------------------------
def test_the_index_holds_idle_entries_with_kv_only():
    store = make_store(10 * 64)
    a = filled(store, "a", 40)
    store.release(a)
    assert store.longest_prefix(list(range(50))) == (a, 40)
    store.acquire(a)  # a request runs on it
    assert a.busy and store.longest_prefix(list(range(50))) is None
    a.token_ids.append(99)  # what the engine does while it runs
    a.kv.num_tokens += 1
    store.release(a)
    assert store.longest_prefix(list(range(40)) + [99, 0]) == (a, 41)
    store.drop_kv(a)
    assert store.longest_prefix(list(range(50))) is None and "a" not in store.index
    assert store.get("a") is a  # a session keeps its ids without KV


def test_deleted_and_evicted_entries_leave_the_index():
    store = make_store(2 * 64)
    a, b = filled(store, "a", 64), filled(store, "b", 64)
    store.release(a)
    store.release(b)
    assert store.delete("a") and "a" not in store.index
    filled(store, "c", 64)
    store.reserve(store.get_or_create("d"), 64)  # evicts b
    assert b.kv is None and "b" not in store.index and len(store.index) == 0


def test_stateless_entries_are_forgotten_with_their_kv():
    store = make_store(2 * 64)
    s = store.new_stateless()
    assert s.stateless and s.seq_id.startswith(STATELESS_KEY_PREFIX)
    store.reserve(s, 40)
    s.token_ids, s.kv.num_tokens = list(range(40)), 40
    store.release(s)
    assert store.longest_prefix(list(range(40))) == (s, 40)
    filled(store, "x", 64)
    filled(store, "y", 64)  # evicts s: nothing of it is kept
    assert store.get(s.seq_id) is None and len(store.index) == 0
    empty = store.new_stateless()
    store.release(empty)  # a stateless entry that never got KV
    assert store.get(empty.seq_id) is None
    assert_accounting(store)


def test_copy_prefix_protects_its_source_and_gives_up_when_both_cannot_fit():
    store = make_store(3 * 64)
    source = filled(store, "src", 64)
    for i in range(64):
        source.kv.data[:, :, :, i] = float(i)
    store.release(source)
    filled(store, "old", 64)
    store.release(store.get("old"))
    store.touch(source)  # "old" is now the least recently used
    copy = store.new_stateless(protect=source)
    assert store.copy_prefix(source, copy, 20, reserve_tokens=100)  # evicts "old", not the source
    assert store.get("old").kv is None and source.kv is not None
    assert copy.token_ids == list(range(20)) and copy.num_cached == 20
    assert torch.equal(copy.kv.data[:, :, :, :20], source.kv.data[:, :, :, :20])
    store.acquire(copy)  # a request runs on it
    other = store.new_stateless(protect=source)
    assert not store.copy_prefix(source, other, 20, reserve_tokens=100)  # needs 128 beside 64 + 128
    assert other.kv is None and source.kv is not None
    assert_accounting(store)


def test_new_stateless_entries_never_forget_the_protected_source():
    store = make_store(10 * 64, max_sequences=2)
    source = filled(store, "src", 20)
    store.release(source)
    filled(store, "b", 20)
    store.release(store.get("b"))
    store.touch(store.get("b"))
    entry = store.new_stateless(protect=source)  # over max_sequences: forgets b, not the source
    assert store.get("src") is source and store.get("b") is None and store.get(entry.seq_id) is entry


def test_drop_stateless_keeps_sessions_and_running_entries():
    store = make_store(4096)
    session = filled(store, "conversation", 40)
    store.release(session)  # idle, indexed
    idle = [store.new_stateless() for _ in range(2)]
    for entry in idle:
        store.reserve(entry, 32)
        entry.token_ids, entry.kv.num_tokens = list(range(32)), 32
        store.release(entry)
    running = store.new_stateless()
    store.acquire(running)
    store.reserve(running, 16)
    freed = sum(e.kv.nbytes for e in idle)
    forgotten = []
    assert store.drop_stateless(forgotten.append) == {"dropped_entries": 2, "freed_bytes": freed,
                                                      "running_entries": 1}
    assert forgotten == [list(range(32))] * 2  # their chunks leave the lower tiers too
    assert set(store.entries) == {"conversation", running.seq_id}
    assert store.get("conversation").kv is session.kv and len(store.index) == 1  # the session, still indexed
    assert store.longest_prefix(list(range(32))) == (session, 32)
    assert_accounting(store)
