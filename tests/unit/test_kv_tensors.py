"""The KV tensor API's pure parts: the store (services/worker/kv/tensors.py) and the wire codec
(services/worker/kv/tensor_codec.py)."""

import base64
import io
import pickle
import zipfile

import pytest
import torch

from services.worker.kv.tensor_codec import InvalidTensor, TensorTooLarge, decode_tensor, encode_tensor
from services.worker.kv.tensors import ENTRY_OVERHEAD_BYTES, KVTensorStore, OverBudget, ShapeMismatch

HEADS, DIM = 2, 4
POSITION_BYTES = HEADS * DIM * 4  # one position of K (or V), float32


def kv(seq_len: int, fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if fill is not None:
        return torch.full((seq_len, HEADS, DIM), fill), torch.full((seq_len, HEADS, DIM), -fill)
    return torch.randn(seq_len, HEADS, DIM), torch.randn(seq_len, HEADS, DIM)


def layer_bytes(seq_len: int) -> int:
    return 2 * seq_len * POSITION_BYTES + ENTRY_OVERHEAD_BYTES


def test_put_get_length_and_delete():
    store = KVTensorStore(budget_bytes=2**20, max_tensor_bytes=2**16)
    k, v = kv(5)
    assert store.put("s", 0, k, v) == 5
    got_k, got_v = store.get("s", 0)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    assert store.length("s", 0) == 5 and store.length("s", 1) == 0 and store.get("s", 1) is None
    assert store.put("s", 0, *kv(3)) == 3  # a put replaces the layer
    assert store.delete("s") == 1 and store.get("s", 0) is None and store.delete("s") == 0
    stats = store.stats()
    assert (stats["kv_tensor_bytes"], stats["kv_tensor_seqs"], stats["kv_tensor_hits"], stats["kv_tensor_misses"]) \
        == (0, 0, 1, 2)


def test_appends_grow_the_sequence_axis_and_keep_every_position():
    store = KVTensorStore(budget_bytes=2**20, max_tensor_bytes=2**16)
    k0, v0 = kv(5)
    assert store.append("s", 3, k0, v0) == 5  # an append to nothing is a put
    pieces = [kv(1) for _ in range(6)] + [kv(3)]
    for i, (k, v) in enumerate(pieces):
        assert store.append("s", 3, k, v) == 5 + sum(p[0].shape[0] for p in pieces[:i + 1])
    k, v = store.get("s", 3)
    assert torch.equal(k, torch.cat([k0, *(p[0] for p in pieces)]))
    assert torch.equal(v, torch.cat([v0, *(p[1] for p in pieces)]))


def test_a_view_read_before_an_append_does_not_change():
    store = KVTensorStore(budget_bytes=2**20, max_tensor_bytes=2**16)
    store.put("s", 0, *kv(2, fill=1.0))
    store.append("s", 0, *kv(1, fill=2.0))  # grows to spare capacity (4 positions)
    before_k, _ = store.get("s", 0)
    snapshot = before_k.clone()
    store.append("s", 0, *kv(1, fill=3.0))  # written in place, past the view
    assert torch.equal(before_k, snapshot) and store.length("s", 0) == 4


def test_appends_must_match_the_layer_except_on_the_sequence_axis():
    store = KVTensorStore(budget_bytes=2**20, max_tensor_bytes=2**16)
    store.put("s", 0, *kv(4))
    with pytest.raises(ShapeMismatch, match="except on axis 0"):
        store.append("s", 0, torch.randn(1, HEADS + 1, DIM), torch.randn(1, HEADS + 1, DIM))
    with pytest.raises(ShapeMismatch, match="except on axis 0"):
        store.append("s", 0, torch.randn(1, HEADS, DIM).half(), torch.randn(1, HEADS, DIM).half())
    with pytest.raises(ShapeMismatch, match="same seq_len"):
        store.append("s", 0, torch.randn(1, HEADS, DIM), torch.randn(2, HEADS, DIM))
    with pytest.raises(ShapeMismatch, match=r"\[seq_len, num_heads, head_dim\]"):
        store.put("s", 1, torch.randn(4, DIM), torch.randn(4, DIM))
    assert store.length("s", 0) == 4 and store.length("s", 1) == 0  # refused writes changed nothing


def test_k_and_v_may_have_different_head_sizes():
    store = KVTensorStore(budget_bytes=2**20, max_tensor_bytes=2**16)
    assert store.put("s", 0, torch.randn(3, 1, 8), torch.randn(3, 1, 4)) == 3
    assert store.append("s", 0, torch.randn(2, 1, 8), torch.randn(2, 1, 4)) == 5


def test_lru_evicts_whole_sequences_least_recently_used_first():
    store = KVTensorStore(budget_bytes=3 * 2 * layer_bytes(4), max_tensor_bytes=2**16)  # 3 sequences of 2 layers
    for seq_id in ("a", "b", "c"):
        for layer in (0, 1):
            store.put(seq_id, layer, *kv(4))
    assert store.get("a", 1) is not None  # "a" is used: "b" is now the least recently used
    store.put("d", 0, *kv(4))
    assert [store.length(s, layer) for s in "abcd" for layer in (0, 1)] == [4, 4, 0, 0, 4, 4, 4, 0]
    stats = store.stats()
    assert stats["kv_tensor_evicted_seqs"] == 1 and stats["kv_tensor_evicted_bytes"] == 2 * layer_bytes(4)
    assert stats["kv_tensor_bytes"] == 5 * layer_bytes(4) <= stats["kv_tensor_budget_bytes"]


def test_a_sequence_larger_than_the_budget_is_refused_and_evicts_nothing():
    store = KVTensorStore(budget_bytes=2 * layer_bytes(4), max_tensor_bytes=2**16)
    store.put("a", 0, *kv(4))
    store.put("b", 0, *kv(4))
    with pytest.raises(OverBudget, match="budget"):
        store.put("c", 0, *kv(20))
    assert store.length("a", 0) == 4 and store.length("b", 0) == 4
    with pytest.raises(OverBudget, match="budget"):
        for _ in range(100):
            store.append("b", 0, *kv(1))
    assert store.length("b", 0) == 4 + ((layer_bytes(4) * 2 - ENTRY_OVERHEAD_BYTES) // (2 * POSITION_BYTES) - 4)
    assert store.length("a", 0) == 0  # "b" grew by evicting "a", never past the budget
    assert store.stats()["kv_tensor_bytes"] <= store.budget_bytes and store.stats()["kv_tensor_refused"] == 2


def test_a_tensor_over_the_per_tensor_limit_is_refused():
    store = KVTensorStore(budget_bytes=2**20, max_tensor_bytes=10 * POSITION_BYTES)
    with pytest.raises(OverBudget, match="per \\(seq_id, layer\\) tensor"):
        store.put("s", 0, *kv(11))
    store.put("s", 0, *kv(10))
    with pytest.raises(OverBudget, match="per \\(seq_id, layer\\) tensor"):
        store.append("s", 0, *kv(1))
    assert store.length("s", 0) == 10


def test_the_store_is_safe_under_threads():
    import threading

    store = KVTensorStore(budget_bytes=2**22, max_tensor_bytes=2**20)

    def appender(seq_id: str) -> None:
        for _ in range(200):
            store.append(seq_id, 0, *kv(1, fill=1.0))

    threads = [threading.Thread(target=appender, args=(f"s{i % 2}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.length("s0", 0) == store.length("s1", 0) == 400
    assert torch.all(store.get("s0", 0)[0] == 1.0)


@pytest.mark.parametrize("encoding", ["torch", "raw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_then_decode_is_exact(encoding, dtype):
    tensor = torch.randn(6, HEADS, DIM).to(dtype)
    wire = encode_tensor(tensor[2:5], encoding)  # a view: only its values travel
    assert wire["shape"] == [3, HEADS, DIM] and wire["dtype"] == str(dtype) and wire["encoding"] == encoding
    back = decode_tensor(wire["data"], wire["shape"], wire["dtype"], encoding, max_bytes=2**20)
    assert back.dtype == dtype and torch.equal(back, tensor[2:5])
    assert back.untyped_storage().nbytes() == back.numel() * back.element_size()


def test_the_reference_designs_torch_save_of_a_view_is_stored_without_its_whole_storage():
    big = torch.randn(100, HEADS, DIM)
    buffer = io.BytesIO()
    torch.save(big[-1:], buffer)  # the reference's serialize_tensor of a slice: the whole storage
    data = base64.b64encode(buffer.getvalue()).decode()
    back = decode_tensor(data, [1, HEADS, DIM], "torch.float32", "torch", max_bytes=2**20)
    assert torch.equal(back, big[-1:]) and back.untyped_storage().nbytes() == POSITION_BYTES


def test_declared_shape_and_dtype_must_match_the_data():
    wire = encode_tensor(torch.randn(3, HEADS, DIM), "torch")
    with pytest.raises(InvalidTensor, match="not the declared"):
        decode_tensor(wire["data"], [3, HEADS, DIM], "float16", "torch", max_bytes=2**20)
    with pytest.raises(InvalidTensor, match="not the declared"):
        decode_tensor(wire["data"], [1, HEADS, DIM], "float32", "torch", max_bytes=2**20)
    raw = encode_tensor(torch.randn(3, HEADS, DIM), "raw")
    with pytest.raises(InvalidTensor, match="needs"):
        decode_tensor(raw["data"], [4, HEADS, DIM], "float32", "raw", max_bytes=2**20)
    with pytest.raises(InvalidTensor, match="base64"):
        decode_tensor("not base64!", [4, 1, 1], "float32", "raw", max_bytes=2**20)


def test_limits_are_checked_before_decoding():
    with pytest.raises(TensorTooLarge, match="over the limit"):
        decode_tensor("AAAA", [1024, 1024, 1024], "float32", "raw", max_bytes=2**20)
    with pytest.raises(InvalidTensor, match="longer than"):
        decode_tensor("A" * 4096, [1, 1, 1], "float32", "raw", max_bytes=2**20)


class Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_torch_save_data_is_never_unpickled_freely(capsys):
    buffer = io.BytesIO()
    torch.save({"x": Boom()}, buffer)  # a pickle that would call a function when loaded freely
    data = base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(InvalidTensor, match="weights_only"):
        decode_tensor(data, [1, 1, 1], "float32", "torch", max_bytes=2**20)
    plain = base64.b64encode(pickle.dumps(torch.zeros(1, 1, 1))).decode()  # not torch.save's zip
    with pytest.raises(InvalidTensor, match="torch.save's format"):
        decode_tensor(plain, [1, 1, 1], "float32", "torch", max_bytes=2**20)
    assert "unpickled!" not in capsys.readouterr().out
    with pytest.raises(InvalidTensor, match="raw"):
        decode_tensor(data, [1, 1, 1], "float32", "torch", max_bytes=2**20, allow_torch_save=False)


def test_a_compressed_archive_is_refused():
    buffer = io.BytesIO()
    torch.save(torch.zeros(1, 1, 1), buffer)
    recompressed = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as source, \
            zipfile.ZipFile(recompressed, "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            target.writestr(member.filename, source.read(member))
    data = base64.b64encode(recompressed.getvalue()).decode()
    with pytest.raises(InvalidTensor, match="uncompressed"):
        decode_tensor(data, [1, 1, 1], "float32", "torch", max_bytes=2**20)
