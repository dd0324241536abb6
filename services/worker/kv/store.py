"""Per-sequence KV cache with a byte budget and whole-sequence LRU eviction.

Each sequence owns one preallocated buffer `[layers, 2, kv_heads, capacity, head_dim]`; new
tokens are written in place at their positions (no concatenation), and the buffer grows
geometrically, so appending is amortized O(1). Entries sit in an OrderedDict in LRU order.
Eviction frees a sequence's whole buffer (never some layers) and keeps its token ids, so its
next request recomputes the KV and produces the same output.

Stateless entries (the OpenAI-style API) are pure cache: an internal key, no session behind
them, forgotten with their KV. The prefix index lists every idle entry that holds KV (session
or stateless), so a stateless request can start from the longest cached prefix of its prompt.
An entry is out of the index while busy; every change to its ids or KV happens then, or drops
it from the index (drop_kv).
"""

import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.worker.kv.prefix_index import PrefixIndex

BLOCK_TOKENS = 64  # capacity granularity
STATELESS_KEY_PREFIX = "~"  # outside the seq_id alphabet: never a session's key


class KVCapacityError(Exception):
    """The budget cannot hold the request, even after evicting every idle sequence."""

    def __init__(self, message: str, *, ever_fits: bool):
        super().__init__(message)
        self.ever_fits = ever_fits


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_positions: int

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize


class SequenceKV:
    """One sequence's K/V. `num_tokens` positions are valid; writes beyond it are scratch."""

    def __init__(self, layout: KVLayout, capacity: int):
        # [layers, 2 (k, v), kv_heads, capacity, head_dim]: each head's positions are contiguous
        # rows, which attention reads faster than the paper's [seq_len, heads, head_dim].
        self.data = torch.empty((layout.num_layers, 2, layout.num_kv_heads, capacity, layout.head_dim),
                                dtype=layout.dtype, device=layout.device)
        self._num_tokens = 0
        # Moves whenever valid positions are given up, so may be written again (a reader on
        # another thread, the tier writer, discards what it copied meanwhile).
        self.epoch = 0

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @num_tokens.setter
    def num_tokens(self, n: int) -> None:
        if n < self._num_tokens:
            self.epoch += 1
        self._num_tokens = n

    @property
    def capacity(self) -> int:
        return self.data.shape[3]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor):
        """Write keys `[n, kv_heads, head_dim]` and values `[n, kv_heads, v_dim]` at positions
        start..start+n; return the layer's K and V views over positions 0..start+n,
        `[start+n, kv_heads, head_dim]` and `[start+n, kv_heads, v_dim]` (no copy). Values
        narrower than keys (MLA) fill the first v_dim columns of their rows."""
        end = start + keys.shape[0]
        self.data[layer, 0, :, start:end] = keys.transpose(0, 1)
        if values.shape[-1] == self.data.shape[-1]:
            self.data[layer, 1, :, start:end] = values.transpose(0, 1)
            return self.data[layer, 0, :, :end].transpose(0, 1), self.data[layer, 1, :, :end].transpose(0, 1)
        v_rows = self.data[layer, 1, :, :end, :values.shape[-1]]
        v_rows[:, start:end] = values.transpose(0, 1)
        return self.data[layer, 0, :, :end].transpose(0, 1), v_rows.transpose(0, 1)

    def copy_from(self, other: "SequenceKV") -> None:
        n = other.num_tokens
        self.data[:, :, :, :n] = other.data[:, :, :, :n]
        self.num_tokens = n


@dataclass
class SequenceEntry:
    seq_id: str
    token_ids: list[int] = field(default_factory=list)
    kv: SequenceKV | None = None
    busy: bool = False  # a request is running on it, or its KV is being copied: never evicted
    imported_tokens: int = 0  # positions pulled from another worker, not yet used by a request
    stateless: bool = False  # pure cache: never exported, never in the session store
    shared_tokens: int = 0  # leading positions whose chunks are written (or queued) to the shared tier

    @property
    def num_cached(self) -> int:
        return min(self.kv.num_tokens, len(self.token_ids)) if self.kv else 0

    def cached_prefix(self, token_ids: list[int]) -> int:
        """How many leading positions of `token_ids` this entry's KV holds."""
        return common_prefix_len(self.token_ids[:self.num_cached], token_ids)

    def reconcile(self, token_ids: list[int]) -> None:
        """Adopt `token_ids` (the session store's history) as the sequence; KV is kept for the
        common prefix only, and at least the last position is left to compute (its logits)."""
        if self.kv is not None:
            self.kv.num_tokens = min(self.cached_prefix(token_ids), len(token_ids) - 1)
        self.shared_tokens = min(self.shared_tokens, common_prefix_len(self.token_ids, token_ids))
        self.token_ids = list(token_ids)


class KVStore:
    def __init__(self, layout: KVLayout, budget_bytes: int, max_sequences: int = 100_000,
                 spill: Callable[[SequenceEntry], None] | None = None):
        self.layout = layout
        # Told of each idle entry evicted for room, before its KV is dropped (the lower tiers).
        self.spill = spill
        self.budget_bytes = budget_bytes
        self.max_sequences = max_sequences
        self.entries: OrderedDict[str, SequenceEntry] = OrderedDict()
        self.used_bytes = 0
        self.peak_bytes = 0
        self.evictions = 0
        self.index = PrefixIndex()
        self._stateless_ids = itertools.count()

    def get(self, seq_id: str) -> SequenceEntry | None:
        return self.entries.get(seq_id)

    def get_or_create(self, seq_id: str) -> SequenceEntry:
        entry = self.entries.get(seq_id)
        if entry is None:
            entry = self.entries[seq_id] = SequenceEntry(seq_id)
            self._forget_oldest_idle(keep={seq_id})
        self.entries.move_to_end(seq_id)
        return entry

    def new_stateless(self, protect: SequenceEntry | None = None) -> SequenceEntry:
        """A fresh stateless entry (most recently used); `protect` is not forgotten to make room."""
        key = f"{STATELESS_KEY_PREFIX}{next(self._stateless_ids)}"
        entry = self.entries[key] = SequenceEntry(key, stateless=True)
        self._forget_oldest_idle(keep={key, protect.seq_id if protect else key})
        return entry

    def touch(self, entry: SequenceEntry) -> None:
        self.entries.move_to_end(entry.seq_id)

    # --- the prefix index ------------------------------------------------------------------
    def acquire(self, entry: SequenceEntry) -> None:
        """A request (or a KV transfer) takes the entry: busy, and out of the index."""
        entry.busy = True
        self.index.remove(entry.seq_id)

    def release(self, entry: SequenceEntry) -> None:
        """Idle again: indexed by its cached ids; a stateless entry without KV is forgotten."""
        entry.busy = False
        if entry.num_cached:
            self.index.update(entry.seq_id, entry.token_ids[:entry.num_cached])
        elif entry.stateless:
            self.delete(entry.seq_id)

    def longest_prefix(self, token_ids: list[int]) -> tuple[SequenceEntry, int] | None:
        """The idle entry whose KV covers the longest prefix of `token_ids` (at least one index
        block), and that prefix's exact length."""
        match = self.index.longest_match(token_ids, lambda key: self.entries[key].cached_prefix(token_ids))
        return (self.entries[match[0]], match[1]) if match else None

    def copy_prefix(self, source: SequenceEntry, entry: SequenceEntry, num_tokens: int,
                    reserve_tokens: int) -> bool:
        """Reserve `reserve_tokens` positions for the empty `entry` (never evicting `source`) and
        copy `source`'s first `num_tokens` positions (ids and KV) into it. False, and nothing
        copied, if the budget cannot hold both."""
        try:
            self.reserve(entry, reserve_tokens, protect=source)
        except KVCapacityError:
            return False
        entry.kv.data[:, :, :, :num_tokens] = source.kv.data[:, :, :, :num_tokens]
        entry.kv.num_tokens = num_tokens
        entry.token_ids = source.token_ids[:num_tokens]
        entry.shared_tokens = min(source.shared_tokens, num_tokens)  # those chunks are written already
        self.touch(source)
        return True

    # --- the byte budget -------------------------------------------------------------------
    def reserve(self, entry: SequenceEntry, num_tokens: int, protect: SequenceEntry | None = None) -> None:
        """Make `entry.kv` hold at least `num_tokens` positions, evicting idle sequences (LRU
        first, never `protect`) as needed. Old and new buffers coexist during a grow, so both
        are counted; if they cannot, the entry's own KV is dropped (read `entry.num_cached`
        afterwards)."""
        if num_tokens > self.layout.max_positions:
            raise ValueError(f"{num_tokens} tokens exceed the model window {self.layout.max_positions}")
        current = entry.kv.capacity if entry.kv else 0
        if num_tokens <= current:
            return
        exact = min(_round_up(num_tokens, BLOCK_TOKENS), self.layout.max_positions)
        doubled = min(max(exact, 2 * current), self.layout.max_positions)
        bpt = self.layout.bytes_per_token
        keep = {entry.seq_id, protect.seq_id if protect else entry.seq_id}
        if self.used_bytes + doubled * bpt <= self.budget_bytes:  # geometric growth if free
            self._grow(entry, doubled)
            return
        if self._make_room(exact * bpt, keep):
            self._grow(entry, exact)
            return
        if entry.kv is not None:  # cannot hold old and new at once: recompute this one instead
            self.drop_kv(entry)
            if self._make_room(exact * bpt, keep):
                self._grow(entry, exact)
                return
        need = exact * self.layout.bytes_per_token
        raise KVCapacityError(
            f"KV for {num_tokens} tokens needs {need} bytes; budget {self.budget_bytes}, "
            f"in use by running sequences {self.used_bytes - (entry.kv.nbytes if entry.kv else 0)}",
            ever_fits=need <= self.budget_bytes)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` positions could ever fit the budget."""
        return min(_round_up(num_tokens, BLOCK_TOKENS), self.layout.max_positions) \
            * self.layout.bytes_per_token <= self.budget_bytes

    def drop_kv(self, entry: SequenceEntry) -> None:
        self.index.remove(entry.seq_id)
        if entry.kv is not None:
            self.used_bytes -= entry.kv.nbytes
            entry.kv = None

    def delete(self, seq_id: str) -> bool:
        entry = self.entries.get(seq_id)
        if entry is None or entry.busy:
            return False
        if entry.kv is not None:
            entry.kv.num_tokens = 0  # a tier write of it still queued is discarded (its epoch moves)
        self.drop_kv(entry)
        del self.entries[seq_id]
        return True

    def drop_stateless(self, forget: Callable[[list[int]], None] | None = None) -> dict:
        """Forgets every idle stateless entry (pure prefix cache; sessions are kept), and passes
        each one's token ids to `forget` (the lower tiers). A running request's entry stays: it is
        in use, and cached again when the request ends."""
        dropped = freed_bytes = running = 0
        for entry in [e for e in self.entries.values() if e.stateless]:
            if entry.busy:
                running += 1
                continue
            freed_bytes += entry.kv.nbytes if entry.kv else 0
            ids = list(entry.token_ids)
            if self.delete(entry.seq_id):
                dropped += 1
                if forget is not None:
                    forget(ids)
        return {"dropped_entries": dropped, "freed_bytes": freed_bytes, "running_entries": running}

    def stats(self) -> dict:
        cached = [e for e in self.entries.values() if e.kv is not None]
        return {
            "sequences": len(self.entries),
            "stateless_sequences": sum(e.stateless for e in self.entries.values()),
            "prefix_indexed_sequences": len(self.index),
            "cached_sequences": len(cached),
            "cached_tokens": sum(e.num_cached for e in cached),
            "kv_bytes_used": self.used_bytes,
            "kv_bytes_peak": self.peak_bytes,
            "kv_bytes_limit": self.budget_bytes,
            "kv_bytes_per_token": self.layout.bytes_per_token,
            "evictions": self.evictions,
        }

    def _grow(self, entry: SequenceEntry, capacity: int) -> None:
        new = SequenceKV(self.layout, capacity)
        self.used_bytes += new.nbytes
        self.peak_bytes = max(self.peak_bytes, self.used_bytes)
        if entry.kv is not None:
            new.copy_from(entry.kv)
            self.drop_kv(entry)
        entry.kv = new

    def _make_room(self, nbytes: int, keep: set[str]) -> bool:
        if self.used_bytes + nbytes <= self.budget_bytes:
            return True
        for entry in list(self.entries.values()):  # LRU first
            if entry.busy or entry.kv is None or entry.seq_id in keep:
                continue
            if self.spill is not None:
                self.spill(entry)
            self.drop_kv(entry)
            if entry.stateless:  # nothing left of a pure cache entry
                del self.entries[entry.seq_id]
            self.evictions += 1
            if self.used_bytes + nbytes <= self.budget_bytes:
                return True
        return False

    def _forget_oldest_idle(self, keep: set[str]) -> None:
        while len(self.entries) > self.max_sequences:
            victim = next((e for e in self.entries.values() if not e.busy and e.seq_id not in keep), None)
            if victim is None:
                return
            self.drop_kv(victim)
            del self.entries[victim.seq_id]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, at C speed
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block
