"""Threads other than the engine's run torch ops alone (services/worker/cpu_threads.py): a torch
thread team beside the engine thread's slowed every later forward of the engine (README, "Turn
overhead"). Whether an op started a team is read from the threads the process gained."""

import os
import random
import threading

import pytest
import torch

from services.worker.cpu_threads import confine_to_one_thread, confined_executor
from services.worker.kv import chunks as ck
from services.worker.kv.lower import LowerTiers
from services.worker.kv.store import KVLayout, SequenceEntry, SequenceKV
from services.worker.kv.tiers import DiskTier, HostTier, open_shared_store

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the threads from /proc")

# Large enough that torch runs its copies in parallel: a chunk is 1 M values.
LAYOUT = KVLayout(num_layers=4, num_kv_heads=8, head_dim=64, dtype=torch.float32,
                  device=torch.device("cpu"), max_positions=2048)
FP = {"model": "m", "revision": "r1", "dtype": "F32", "layers": 4, "kv_heads": 8, "head_dim": 64}


def thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def large_ops() -> None:
    a = torch.randn(512, 512)
    a @ a  # MKL's or OpenMP's team
    torch.randn(4_000_000).clone()  # OpenMP's


def on_new_thread(work, confine: bool) -> tuple[set[str], int]:
    """The threads that appeared while `work` ran on a new thread, and torch's count there."""
    out = {}

    def run() -> None:
        if confine:
            confine_to_one_thread()
        before = thread_ids()
        work()
        out["started"] = thread_ids() - before
        out["torch_threads"] = torch.get_num_threads()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out["started"], out["torch_threads"]


@pytest.fixture
def two_torch_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    started, _ = on_new_thread(large_ops, confine=False)
    if not started:
        torch.set_num_threads(previous)
        pytest.skip("this torch build starts no thread team for large ops")
    yield
    torch.set_num_threads(previous)


def test_a_confined_thread_starts_no_team_and_others_keep_their_count(two_torch_threads):
    started, torch_threads = on_new_thread(large_ops, confine=True)
    assert started == set() and torch_threads == 1
    # Nothing global changed: this thread, and a thread started after, still run ops on two.
    assert torch.get_num_threads() == 2
    assert on_new_thread(lambda: None, confine=False)[1] == 2


def test_the_default_executors_threads_are_confined(two_torch_threads):
    with confined_executor() as pool:
        assert pool.submit(torch.get_num_threads).result() == 1
        before = thread_ids() | {str(threading.get_native_id())}
        pool.submit(large_ops).result()
        assert thread_ids() - before <= {str(t.native_id) for t in threading.enumerate()}  # the pool's own


def test_the_tier_writers_copies_start_no_team(two_torch_threads, tmp_path):
    tiers = LowerTiers(LAYOUT, FP, HostTier(2**30, pin=False), DiskTier(tmp_path / "disk", 2**30),
                       open_shared_store(str(tmp_path / "shared"), 3600, 2**30))
    rng = random.Random(0)
    entry = SequenceEntry("s", [rng.randrange(50_000) for _ in range(3 * ck.CHUNK_TOKENS)])
    entry.kv = SequenceKV(LAYOUT, len(entry.token_ids))
    entry.kv.data.normal_()
    entry.kv.num_tokens = len(entry.token_ids)
    before = thread_ids()
    tiers.write_behind(entry)  # copies each chunk out of the live buffer
    tiers.spill(entry)         # copies each chunk into host memory
    assert tiers.flush(30)
    assert tiers.stats()["tiers"]["shared"]["bytes_stored"] > 0
    assert thread_ids() - before == set()
