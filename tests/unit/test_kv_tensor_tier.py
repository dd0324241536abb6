"""The KV tensor store over the shared KV tier (a real directory; a real redis-server): what its
budget evicts is written there and comes back whole on the next use, on this worker or another."""

import pytest
import torch

from services.worker.kv.tensor_tier import TensorTier
from services.worker.kv.tensors import KVTensorStore
from services.worker.kv.tiers import open_shared_store


def layer(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, generator=g), torch.randn(n, 4, 8, generator=g)


@pytest.fixture(params=["directory", "redis"])
def shared(request, tmp_path):
    if request.param == "redis":
        return open_shared_store(request.getfixturevalue("redis_url"), ttl_s=600, budget_bytes=0)
    return open_shared_store(str(tmp_path / "shared"), ttl_s=600, budget_bytes=2**30)


def test_evicted_sequences_come_back_whole_here_and_on_another_worker(shared):
    one_seq = 2 * 64 * 4 * 8 * 4 * 2 + 2048  # two layers of 64 positions, K and V, plus overhead
    store = KVTensorStore(one_seq, 2**20, TensorTier(shared))
    a0, a1 = layer(64, 1), layer(60, 2)
    store.put("a", 0, *a0)
    store.put("a", 1, a1[0][:50], a1[1][:50])
    store.append("a", 1, a1[0][50:], a1[1][50:])
    store.put("b", 0, *layer(64, 3))  # a is evicted, to the tier
    assert store.stats()["kv_tensor_tier_saves"] == 1 and store.stats()["kv_tensor_seqs"] == 1
    k, v = store.get("a", 1)  # back whole (b goes to the tier in turn)
    assert torch.equal(k, a1[0]) and torch.equal(v, a1[1]) and store.length("a", 0) == 64
    other = KVTensorStore(one_seq, 2**20, TensorTier(shared))  # another worker, same shared tier
    k, v = other.get("b", 0)
    assert torch.equal(k, layer(64, 3)[0]) and other.stats()["kv_tensor_tier_loads"] == 1
    assert other.delete("b") == 1
    assert TensorTier(shared).load("b") is None and KVTensorStore(one_seq, 2**20, TensorTier(shared)).get("b", 0) is None


def test_a_tier_entry_of_another_sequence_is_not_loaded(shared):
    tier = TensorTier(shared)
    tier.save("x", {0: layer(4, 5)})
    shared.put(tier._key("y", None), shared.get(tier._key("x", None)))  # y's index names x
    assert tier.load("y") is None
    shared.put(tier._key("y", None), b'{"seq_id": "y", "layers": [0]}')
    shared.put(tier._key("y", 0), shared.get(tier._key("x", 0)))  # y's layer holds x's tensors
    assert tier.load("y") is None
