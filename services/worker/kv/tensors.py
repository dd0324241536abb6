"""The store behind the KV tensor API: (seq_id, layer) -> K, V tensors, in this worker's memory.

Pure (torch only, no FastAPI), thread-safe (one lock: the routes call it from worker threads).
- A layer's K and V are [seq_len, num_heads, head_dim]; K and V have the same seq_len and dtype
  (their head sizes may differ). An append adds positions on axis 0 and must match the rest.
- Appends write in place into spare capacity that doubles when full (amortised O(new positions),
  not a torch.cat of the whole layer per token). The budget counts the capacity: that is the
  memory held.
- A byte budget over every sequence, with LRU eviction of whole seq_ids (never some layers of a
  sequence): a write evicts the least recently used other sequences until it fits, and a
  sequence that cannot fit even alone is refused. Reads (get) count as use; length does not.
- Each (seq_id, layer) tensor is at most `max_tensor_bytes`.
A write is checked whole before anything changes: a refused write leaves the store as it was.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

ENTRY_OVERHEAD_BYTES = 512  # counted per layer, so that millions of tiny entries cannot pass the budget


class KVTensorError(ValueError):
    pass


class ShapeMismatch(KVTensorError):
    """K and V, or an append and the layer it extends, do not agree."""


class OverBudget(KVTensorError):
    """The write would make a tensor or the sequence larger than the store takes."""


@dataclass
class LayerKV:
    k: torch.Tensor  # [capacity, num_heads, head_dim]
    v: torch.Tensor  # [capacity, num_heads, v_head_dim]
    length: int

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k) + _nbytes(self.v) + ENTRY_OVERHEAD_BYTES


@dataclass
class SeqKV:
    layers: dict[int, LayerKV] = field(default_factory=dict)
    nbytes: int = 0


@dataclass
class Counters:
    puts: int = 0
    appends: int = 0
    hits: int = 0
    misses: int = 0
    refused: int = 0
    evicted_seqs: int = 0
    evicted_bytes: int = 0


class KVTensorStore:
    def __init__(self, budget_bytes: int, max_tensor_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.max_tensor_bytes = max_tensor_bytes
        self.counters = Counters()
        self._seqs: OrderedDict[str, SeqKV] = OrderedDict()  # least recently used first
        self._nbytes = 0
        self._lock = threading.Lock()

    def put(self, seq_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Replaces the layer's K and V (tensors the store may keep: not copied). Its seq_len."""
        _check_pair(k, v)
        with self._lock:
            self._check_tensor_bytes(k.shape[0], k, v)
            self._write(seq_id, layer, LayerKV(k, v, k.shape[0]))
            self.counters.puts += 1
            return k.shape[0]

    def append(self, seq_id: str, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Adds positions at the end of the layer (a put if it holds nothing). Its new seq_len."""
        _check_pair(k, v)
        with self._lock:
            seq = self._seqs.get(seq_id)
            old = seq.layers.get(layer) if seq is not None else None
            if old is None:
                self._check_tensor_bytes(k.shape[0], k, v)
                self._write(seq_id, layer, LayerKV(k, v, k.shape[0]))
            else:
                _check_extends(old, k, v)
                self._append(seq_id, layer, old, k, v)
            self.counters.appends += 1
            return self._seqs[seq_id].layers[layer].length

    def get(self, seq_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K and V, [seq_len, ...]: views that later appends never change (they write past
        seq_len, or into a new buffer), so they can be encoded outside the lock."""
        with self._lock:
            entry = self._entry(seq_id, layer)
            if entry is None:
                self.counters.misses += 1
                return None
            self.counters.hits += 1
            self._seqs.move_to_end(seq_id)
            return entry.k[:entry.length], entry.v[:entry.length]

    def length(self, seq_id: str, layer: int) -> int:
        with self._lock:
            entry = self._entry(seq_id, layer)
            return entry.length if entry is not None else 0

    def delete(self, seq_id: str) -> int:
        """Removes every layer of the sequence; how many it held."""
        with self._lock:
            seq = self._seqs.pop(seq_id, None)
            if seq is None:
                return 0
            self._nbytes -= seq.nbytes
            return len(seq.layers)

    def stats(self) -> dict[str, int]:
        with self._lock:
            num_layers = sum(len(s.layers) for s in self._seqs.values())
            return {"kv_tensor_seqs": len(self._seqs), "kv_tensor_layers": num_layers,
                    "kv_tensor_bytes": self._nbytes, "kv_tensor_budget_bytes": self.budget_bytes,
                    **{f"kv_tensor_{name}": value for name, value in vars(self.counters).items()}}

    def _entry(self, seq_id: str, layer: int) -> LayerKV | None:
        seq = self._seqs.get(seq_id)
        return seq.layers.get(layer) if seq is not None else None

    def _check_tensor_bytes(self, length: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for name, tensor in (("k", k), ("v", v)):
            nbytes = length * _bytes_per_position(tensor)
            if nbytes > self.max_tensor_bytes:
                self.counters.refused += 1
                raise OverBudget(f"{name} would hold {nbytes} bytes, over the limit of {self.max_tensor_bytes} "
                                 "bytes per (seq_id, layer) tensor")

    def _append(self, seq_id: str, layer: int, old: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
        needed = old.length + k.shape[0]
        self._check_tensor_bytes(needed, k, v)
        if needed <= old.k.shape[0]:  # spare capacity: write in place, past what readers see
            old.k[old.length:needed] = k
            old.v[old.length:needed] = v
            old.length = needed
            return
        per_position = _bytes_per_position(k) + _bytes_per_position(v)
        max_positions = self.max_tensor_bytes // max(_bytes_per_position(k), _bytes_per_position(v))
        doubled = max(needed, min(2 * old.k.shape[0], max_positions))
        fits = self._fits(seq_id, doubled * per_position + ENTRY_OVERHEAD_BYTES - old.nbytes)
        capacity = doubled if fits else needed  # the exact size when doubling does not fit
        self._require_fits(seq_id, capacity * per_position + ENTRY_OVERHEAD_BYTES - old.nbytes)  # before allocating
        self._write(seq_id, layer, LayerKV(_grown(old.k, k, old.length, capacity),
                                           _grown(old.v, v, old.length, capacity), needed))

    def _fits(self, seq_id: str, delta_bytes: int) -> bool:
        seq = self._seqs.get(seq_id)
        return (seq.nbytes if seq else 0) + delta_bytes <= self.budget_bytes

    def _require_fits(self, seq_id: str, delta_bytes: int) -> None:
        if not self._fits(seq_id, delta_bytes):
            self.counters.refused += 1
            seq = self._seqs.get(seq_id)
            raise OverBudget(f"seq_id would hold {(seq.nbytes if seq else 0) + delta_bytes} bytes, over this "
                             f"worker's KV tensor budget of {self.budget_bytes} bytes")

    def _write(self, seq_id: str, layer: int, entry: LayerKV) -> None:
        seq = self._seqs.get(seq_id)
        old = seq.layers.get(layer) if seq is not None else None
        delta = entry.nbytes - (old.nbytes if old is not None else 0)
        self._require_fits(seq_id, delta)
        self._evict_for(seq_id, delta)
        seq = self._seqs.setdefault(seq_id, SeqKV())
        seq.layers[layer] = entry
        seq.nbytes += delta
        self._nbytes += delta
        self._seqs.move_to_end(seq_id)

    def _evict_for(self, seq_id: str, delta_bytes: int) -> None:
        """Evicts the least recently used other sequences until delta_bytes more fit."""
        while self._nbytes + delta_bytes > self.budget_bytes:
            victim = next(s for s in self._seqs if s != seq_id)  # _fits: the others hold enough
            evicted = self._seqs.pop(victim)
            self._nbytes -= evicted.nbytes
            self.counters.evicted_seqs += 1
            self.counters.evicted_bytes += evicted.nbytes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _bytes_per_position(tensor: torch.Tensor) -> int:
    return tensor[0].numel() * tensor.element_size()


def _check_pair(k: torch.Tensor, v: torch.Tensor) -> None:
    if k.dim() != 3 or v.dim() != 3:
        raise ShapeMismatch(f"k and v must be [seq_len, num_heads, head_dim]; got {list(k.shape)} and {list(v.shape)}")
    if k.shape[0] != v.shape[0] or k.shape[0] == 0:
        raise ShapeMismatch(f"k and v must have the same seq_len, at least 1; got {k.shape[0]} and {v.shape[0]}")
    if k.dtype != v.dtype:
        raise ShapeMismatch(f"k and v must have the same dtype; got {k.dtype} and {v.dtype}")


def _check_extends(old: LayerKV, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, have, new in (("k", old.k, k), ("v", old.v, v)):
        if have.shape[1:] != new.shape[1:] or have.dtype != new.dtype:
            raise ShapeMismatch(f"{name}: an append must match the layer's shape except on axis 0 (seq_len) and its "
                                f"dtype: the layer holds [*, {', '.join(map(str, have.shape[1:]))}] {have.dtype}, "
                                f"the append is {list(new.shape)} {new.dtype}")


def _grown(buffer: torch.Tensor, new: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    grown = torch.empty((capacity, *buffer.shape[1:]), dtype=buffer.dtype)
    grown[:length] = buffer[:length]
    grown[length:length + new.shape[0]] = new
    return grown
