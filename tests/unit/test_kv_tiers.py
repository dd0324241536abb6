"""The lower KV tiers' parts: chunk keys and format, the eviction policy, and each store (a real
directory, fsspec on a real directory, a real redis-server)."""

import os
import random
import time

import pytest
import torch

from services.worker.kv import chunks as ck
from services.worker.kv.chunks import ChunkRejected
from services.worker.kv.policy import LRU, S3FIFO
from services.worker.kv.lower import LowerTiers
from services.worker.kv.store import KVLayout, SequenceEntry, SequenceKV
from services.worker.kv.tiers import DiskTier, FsspecStore, HostTier, RedisStore, open_shared_store

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32,
                  device=torch.device("cpu"), max_positions=512)
FP = {"model": "m", "revision": "r1", "dtype": "F32", "layers": 2, "kv_heads": 2, "head_dim": 4}
ROOT = ck.fingerprint_key(FP)
B = ck.CHUNK_TOKENS


def kv_for(n: int) -> torch.Tensor:
    return torch.randn(LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, n, LAYOUT.head_dim)


# --- keys --------------------------------------------------------------------------------------
def test_chunk_keys_name_whole_prefixes():
    ids = list(range(2 * B + 10))
    refs = ck.chunk_refs(ROOT, ids, len(ids))
    assert [(r.start, r.end) for r in refs] == [(0, B), (B, 2 * B), (2 * B, 2 * B + 10)]
    other_start = [999] + ids[1:]  # one different early token changes every later key
    assert all(a.key != b.key for a, b in zip(refs, ck.chunk_refs(ROOT, other_start, len(ids))))
    longer = ck.chunk_refs(ROOT, ids + [5, 6], len(ids) + 2)  # the same prefix: the same full chunks
    assert [r.key for r in longer[:2]] == [r.key for r in refs[:2]] and longer[2].key != refs[2].key
    other_model = ck.fingerprint_key({**FP, "revision": "r2"})
    assert all(a.key != b.key for a, b in zip(refs, ck.chunk_refs(other_model, ids, len(ids))))


def test_a_stored_tail_is_among_the_candidates_of_a_longer_sequence():
    ids = list(range(B + 20))
    stored_tail = ck.chunk_refs(ROOT, ids, B + 7)[-1]  # a sequence that ended at B + 7
    candidates = ck.tail_candidates(ck.parent_key(ROOT, ck.chunk_refs(ROOT, ids, B, tail=False)), ids, B, limit=B + 20)
    assert candidates[0].end == B + 20 and candidates[-1].end == B + 1  # longest first
    assert stored_tail in candidates


# --- format ------------------------------------------------------------------------------------
def test_encode_decode_round_trip_and_rejections():
    ids = list(range(B))
    ref = ck.chunk_refs(ROOT, ids, B)[0]
    data = kv_for(B)
    raw = ck.encode(ref, data, FP, ids)
    assert torch.equal(ck.decode(raw, ref, FP, ids, LAYOUT), data)
    with pytest.raises(ChunkRejected, match="fingerprint"):
        ck.decode(raw, ref, {**FP, "revision": "r2"}, ids, LAYOUT)
    with pytest.raises(ChunkRejected, match="token ids"):
        ck.decode(raw, ref, FP, [7] + ids[1:], LAYOUT)
    for broken in (raw[:len(raw) // 2], raw[:5], b"\x00" * 64, b"not safetensors at all"):
        with pytest.raises(ChunkRejected):
            ck.decode(broken, ref, FP, ids, LAYOUT)
    wrong_shape = ck.encode(ref, kv_for(B)[:, :, :1].contiguous(), FP, ids)
    with pytest.raises(ChunkRejected, match="expected"):
        ck.decode(wrong_shape, ref, FP, ids, LAYOUT)


def test_no_pickle_in_the_format():
    ids = list(range(B))
    ref = ck.chunk_refs(ROOT, ids, B)[0]
    raw = ck.encode(ref, kv_for(B), FP, ids)
    assert b"\x80\x04" not in raw[:16] and raw[8:9] == b"{"  # a safetensors JSON header, not a pickle


# --- policy ------------------------------------------------------------------------------------
def _hit_ratio(policy, trace) -> float:
    hits = 0
    for key in trace:
        if key in policy:
            hits += 1
            policy.touch(key)
        else:
            policy.insert(key, 1)
    return hits / len(trace)


def test_s3fifo_keeps_a_hot_set_through_a_one_time_scan_where_lru_does_not():
    rng = random.Random(1)
    trace, fresh = [], 1000
    for _ in range(4000):
        if rng.random() < 0.5:
            trace.append(f"hot{rng.randrange(40)}")
        else:
            trace.append(f"scan{fresh}")
            fresh += 1
    s3, lru = _hit_ratio(S3FIFO(64), trace), _hit_ratio(LRU(64), trace)
    assert s3 > lru + 0.1, (s3, lru)


def test_s3fifo_respects_its_byte_budget_and_returns_what_it_evicts():
    policy = S3FIFO(100)
    held: set[str] = set()
    rng = random.Random(2)
    for i in range(500):
        key = f"k{rng.randrange(60)}"
        if key in policy:
            policy.touch(key)
            continue
        evicted = policy.insert(key, rng.randrange(1, 30))
        held.add(key)
        held -= set(evicted)
        assert policy.used_bytes <= 100
        assert held == {k for k in held if k in policy} and len(policy) == len(held)
    assert policy.insert("huge", 101) == ["huge"] and "huge" not in policy


# --- stores ------------------------------------------------------------------------------------
def test_disk_tier_budget_and_restart(tmp_path):
    tier = DiskTier(tmp_path, budget_bytes=3000)
    for i in range(10):
        tier.put(f"k{i}", bytes([i]) * 1000)
    files = list(tmp_path.glob("*.kv.safetensors"))
    assert len(files) == 3 and sum(f.stat().st_size for f in files) <= 3000
    kept = [f"k{i}" for i in range(10) if f"k{i}" in tier]
    assert len(kept) == 3 and all(tier.get(k) == bytes([int(k[1:])]) * 1000 for k in kept)
    (tmp_path / "half.123.tmp").write_bytes(b"x")  # a write a crash cut short
    again = DiskTier(tmp_path, budget_bytes=3000)
    assert {k for k in kept if k in again} == set(kept) and not list(tmp_path.glob("*.tmp"))
    assert again.get("k0" if "k0" not in kept else "nope") is None


def test_fsspec_directory_store_expires_and_keeps_its_budget(tmp_path):
    store = open_shared_store(str(tmp_path / "shared"), ttl_s=60, budget_bytes=2500)
    assert isinstance(store, FsspecStore)
    for i in range(4):
        store.put(f"k{i}", b"x" * 1000)
        os.utime(store._path(f"k{i}"), (time.time() - 10 + i, time.time() - 10 + i))
    assert store.contains(["k0", "k3", "nope"]) == [True, True, False]
    assert store.get("k2") == b"x" * 1000 and store.get("nope") is None
    assert store.sweep() == 2  # over budget: the two oldest go
    assert store.contains(["k0", "k1", "k2", "k3"]) == [False, False, True, True]
    old = time.time() - 120
    os.utime(store._path("k2"), (old, old))
    assert store.sweep() == 1 and store.contains(["k2", "k3"]) == [False, True]  # expired


def test_redis_store_round_trip_and_ttl(redis_url):
    store = open_shared_store(redis_url, ttl_s=1, budget_bytes=0)
    assert isinstance(store, RedisStore)
    store.put("rk", b"payload")
    assert store.contains(["rk", "absent"]) == [True, False] and store.get("rk") == b"payload"
    assert 0 < store.client.ttl(RedisStore.PREFIX + "rk") <= 1
    store.remove("rk")
    assert store.get("rk") is None


# --- the tiers together --------------------------------------------------------------------------
def test_every_revisit_loads_its_whole_history_through_a_small_host_tier(tmp_path):
    """Round-robin revisits of more sequences than host memory holds, from disk and shared: the
    chunks a request read are its own until admission, whatever host memory evicts meanwhile."""
    window = LAYOUT.max_positions * LAYOUT.bytes_per_token
    tiers = LowerTiers(LAYOUT, FP, HostTier(window, pin=False), DiskTier(tmp_path / "disk", 2**30),
                       open_shared_store(str(tmp_path / "shared"), 3600, 2**30))
    rng = random.Random(3)
    entries = []
    for i in range(8):
        entry = SequenceEntry(f"s{i}", [rng.randrange(50_000) for _ in range(300)])
        entry.kv = SequenceKV(LAYOUT, 320)
        entry.kv.data.normal_()
        entry.kv.num_tokens = 300
        tiers.write_behind(entry)
        tiers.spill(entry)
        entries.append(entry)
    assert tiers.flush(10)
    for entry in entries:
        ids = entry.token_ids + [1, 2]
        prefetched = tiers.prefetch(ids, have=0, limit=len(ids) - 1)
        fresh = SequenceEntry(entry.seq_id, ids)
        fresh.kv = SequenceKV(LAYOUT, 320)
        assert tiers.load_into(fresh, prefetched) == 300
        assert torch.equal(fresh.kv.data[:, :, :, :300], entry.kv.data[:, :, :, :300])
    del prefetched
    assert tiers.stats()["staged_bytes"] == 0


def test_a_write_behind_whose_positions_were_given_up_is_discarded(tmp_path):
    """The writer copies from the live buffer: if the sequence gave positions up in the meantime
    (a rolled-back turn: they will be written again), the copy is not this sequence's KV."""
    shared = open_shared_store(str(tmp_path / "shared"), 3600, 2**30)
    tiers = LowerTiers(LAYOUT, FP, HostTier(2**20, pin=False), None, shared)
    kv = SequenceKV(LAYOUT, 128)
    kv.num_tokens = 100
    epoch = kv.epoch
    kv.num_tokens = 40  # given up: positions 40.. will be written again
    kv.num_tokens = 100
    tiers._share(list(range(100)), kv, epoch, 0)
    assert tiers.stats()["write_jobs_discarded"] == 1 and not list((tmp_path / "shared").iterdir())
    tiers._share(list(range(100)), kv, kv.epoch, 0)
    assert len(list((tmp_path / "shared").glob("*.kv.safetensors"))) == 2  # one full chunk and a tail
