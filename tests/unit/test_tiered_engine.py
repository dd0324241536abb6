"""The engine with lower KV tiers (real tiny-gpt2, real directories): a sequence evicted from
device memory, or computed by another engine (another worker), continues from host, disk or
shared chunks, and greedy output equals plain transformers token for token."""

from contextlib import contextmanager

import torch

from services.worker.engine.engine import Engine, EngineConfig
from services.worker.engine.sequence import Request, SamplingParams
from services.worker.kv.lower import LowerTiers
from services.worker.kv.store import KVStore
from services.worker.kv.tiers import DiskTier, HostTier, open_shared_store
from services.worker.kv.transfer import fingerprint
from tests.unit.test_engine import Collector, encode, hf_greedy, hf_model  # noqa: F401 - a fixture

FP = None  # set per model below
LONG_A = "Once upon a time, in a land of rivers and hills, there lived a careful clockmaker. " * 2
LONG_B = "Meanwhile the harbour filled with ships whose sails were patched with old maps. " * 2
LONG_C = "Every winter the village held a market where nobody was allowed to sell bread. " * 2
NEXT = " What happened after that?"
GEN = 8


@contextmanager
def tiered_engine(loaded, tmp_path, device_sequences: float = 1.2, host_bytes: int | None = None,
                  disk: bool = False, shared_dir=None):
    layout = loaded.layout
    per_sequence = 256 * layout.bytes_per_token  # a 160-token context + 8 reserves <= 256 positions
    store = KVStore(layout, int(device_sequences * per_sequence))
    fp = fingerprint(loaded.name, layout, "test")
    tiers = LowerTiers(layout, fp, HostTier(host_bytes or 4 * per_sequence, pin=False),
                       DiskTier(tmp_path / "disk", 16 * per_sequence) if disk else None,
                       open_shared_store(str(shared_dir), 3600, 2**30) if shared_dir else None)
    engine = Engine(loaded, store, EngineConfig(worker_id="w-tiers", tail_wait_s=0.0), tiers=tiers)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def run(engine: Engine, seq_id: str, earlier: list[int], prompt: str, stateless: bool = False) -> Collector:
    """What a worker does: prefetch from the tiers, then queue; waits for `done` and for the
    last token's step, then for the tier writes."""
    sink = Collector()
    prompt_ids = encode(engine, prompt)
    req = Request(seq_id=seq_id, token_ids=earlier + prompt_ids, prompt_tokens=len(prompt_ids), sink=sink,
                  params=SamplingParams(max_tokens=GEN, temperature=0.0), stateless=stateless)
    req.loading = True  # as the worker does: queued, then read while it waits
    engine.submit(req)
    engine.prefetch(req)
    sink.wait()
    _settle(engine)
    return sink


def _settle(engine: Engine) -> None:
    from tests.unit.test_engine import wait_idle
    wait_idle(engine)
    assert engine.tiers.flush(10)


def history(engine: Engine, seq_id: str) -> list[int]:
    return list(engine.store.get(seq_id).token_ids)


def expect_model_output(model, context: list[int], result: Collector) -> None:
    with torch.no_grad():
        assert result.token_ids == hf_greedy(model, context, GEN)


def test_an_evicted_sequence_continues_from_host_memory(loaded_tiny, hf_model, tmp_path):
    with tiered_engine(loaded_tiny, tmp_path) as engine:
        run(engine, "a", [], LONG_A)
        earlier = history(engine, "a")
        run(engine, "b", [], LONG_B)  # device memory holds one: a is evicted, down to host
        assert engine.store.get("a").kv is None and engine.stats()["evictions"] >= 1
        result = run(engine, "a", earlier, NEXT)
        assert result.start["tier_tokens"] == result.start["cached_tokens"] == len(earlier)
        expect_model_output(hf_model, earlier + encode(engine, NEXT), result)
        assert engine.stats()["kv_tiers"]["tiers"]["host"]["hits"] >= 2


def test_host_evicts_to_disk_and_disk_chunks_are_loaded(loaded_tiny, hf_model, tmp_path):
    per_sequence = 256 * loaded_tiny.layout.bytes_per_token
    with tiered_engine(loaded_tiny, tmp_path, host_bytes=per_sequence, disk=True) as engine:
        run(engine, "a", [], LONG_A)
        earlier = history(engine, "a")
        run(engine, "b", [], LONG_B)
        run(engine, "c", [], LONG_C)  # b's spill pushes a's chunks out of host memory, to disk
        assert list((tmp_path / "disk").glob("*.kv.safetensors"))
        result = run(engine, "a", earlier, NEXT)
        assert result.start["cached_tokens"] == len(earlier) and result.start["tier_tokens"] == len(earlier)
        expect_model_output(hf_model, earlier + encode(engine, NEXT), result)
        assert engine.stats()["kv_tiers"]["tiers"]["disk"]["hits"] >= 1


def test_another_worker_continues_a_conversation_from_the_shared_tier(loaded_tiny, hf_model, tmp_path):
    shared = tmp_path / "shared"
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as first:
        run(first, "a", [], LONG_A)
        earlier = history(first, "a")  # written behind after done; then the worker is gone
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as second:
        result = run(second, "a", earlier, NEXT)
        assert result.start["tier_tokens"] == result.start["cached_tokens"] == len(earlier)
        expect_model_output(hf_model, earlier + encode(second, NEXT), result)
        stats = second.stats()["kv_tiers"]
        assert stats["tiers"]["shared"]["hits"] == -(-len(earlier) // 64) and stats["write_jobs_dropped"] == 0


def test_a_stateless_prefix_computed_by_one_worker_is_reused_by_another(loaded_tiny, hf_model, tmp_path):
    shared = tmp_path / "shared"
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as first:
        run(first, "r1", [], LONG_A, stateless=True)
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as second:
        prompt = LONG_A + " Tell me more."
        result = run(second, "r2", [], prompt, stateless=True)
        full_chunks = len(encode(second, LONG_A)) // 64 * 64
        assert result.start["tier_tokens"] == result.start["cached_tokens"] == full_chunks > 0
        expect_model_output(hf_model, encode(second, prompt), result)


def test_a_corrupt_shared_chunk_is_ignored_and_counted(loaded_tiny, hf_model, tmp_path):
    shared = tmp_path / "shared"
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as first:
        run(first, "a", [], LONG_A)
        earlier = history(first, "a")
    second_chunk = sorted(shared.glob("*.kv.safetensors"), key=lambda p: p.stat().st_mtime)
    for path in second_chunk:
        raw = path.read_bytes()
        path.write_bytes(raw[:len(raw) // 2])  # truncated: every chunk is unusable
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as second:
        result = run(second, "a", earlier, NEXT)
        assert result.start["tier_tokens"] == 0 == result.start["cached_tokens"]
        expect_model_output(hf_model, earlier + encode(second, NEXT), result)
        assert second.stats()["kv_tiers"]["tiers"]["shared"]["rejected"] >= 1


def test_another_model_revision_finds_nothing(loaded_tiny, hf_model, tmp_path):
    shared = tmp_path / "shared"
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as first:
        run(first, "a", [], LONG_A)
        earlier = history(first, "a")
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as second:
        second.tiers.fp = {**second.tiers.fp, "revision": "rebuilt"}
        second.tiers.root = b"another root"
        result = run(second, "a", earlier, NEXT)
        assert result.start["tier_tokens"] == 0
        expect_model_output(hf_model, earlier + encode(second, NEXT), result)


def test_a_drain_writes_what_the_shared_tier_lacks(loaded_tiny, hf_model, tmp_path):
    """A write-behind that was dropped (full queue) is made good by the drain's write_behind_all,
    and another worker then continues from it."""
    shared = tmp_path / "shared"
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as first:
        run(first, "a", [], LONG_A)
        earlier = history(first, "a")
        for path in shared.glob("*.kv.safetensors"):
            path.unlink()
        first.store.get("a").shared_tokens = 0  # as if its write had been dropped
        first.write_behind_all()
        assert first.tiers.flush(10) and list(shared.glob("*.kv.safetensors"))
    with tiered_engine(loaded_tiny, tmp_path, shared_dir=shared) as second:
        result = run(second, "a", earlier, NEXT)
        assert result.start["tier_tokens"] == len(earlier)
        expect_model_output(hf_model, earlier + encode(second, NEXT), result)
