"""Which chunk a byte-budgeted tier evicts: S3-FIFO (Yang et al., SOSP 2023), and LRU to compare.

Chosen by measurement (scripts/tier_policy_sim.py, figures in the README): a chat service's
returning users revisit their conversations round-robin-like, more of them than fit. LRU evicts
each conversation just before its return and hits nothing; S3-FIFO admits new chunks to a small
FIFO (10% of the bytes), promotes to the main FIFO only what is asked for again (or returns
from the ghost list of recent small-FIFO evictions), and gives main-FIFO chunks a second chance
per hit. A one-time scan passes through the small FIFO without flushing the main one.
Pure Python; the caller holds the lock and frees what `insert` returns.
"""

from collections import OrderedDict

SMALL_FRACTION = 0.1
MAX_FREQ = 3
# The ghost list remembers keys (no data) evicted from the small FIFO worth this many budgets: a
# conversation returning after more than a budget's worth of others still counts as returning
# (the paper's ghost of one main FIFO measured 0% on scenario 11's round-robin; 4 budgets: see
# the README's policy table). A key costs ~100 bytes.
GHOST_BUDGETS = 4


class S3FIFO:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._small: OrderedDict[str, int] = OrderedDict()  # key -> bytes; first = oldest
        self._main: OrderedDict[str, int] = OrderedDict()
        self._freq: dict[str, int] = {}
        self._small_bytes = 0
        self._ghost: OrderedDict[str, int] = OrderedDict()  # recently evicted from small: bytes
        self._ghost_bytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)

    def touch(self, key: str) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, MAX_FREQ)

    def insert(self, key: str, nbytes: int) -> list[str]:
        """Admit `key` (a no-op if present); returns the keys evicted to make room, which may
        include `key` itself when it is larger than the whole budget."""
        if key in self._freq:
            return []
        if nbytes > self.capacity_bytes:
            return [key]
        evicted = []
        while self.used_bytes + nbytes > self.capacity_bytes:
            evicted.append(self._evict())
        self._freq[key] = 0
        self.used_bytes += nbytes
        if key in self._ghost:  # asked for again soon after leaving the small FIFO: main
            self._ghost_bytes -= self._ghost.pop(key)
            self._main[key] = nbytes
        else:
            self._small[key] = nbytes
            self._small_bytes += nbytes
        return evicted

    def remove(self, key: str) -> None:
        if key not in self._freq:
            return
        del self._freq[key]
        if key in self._small:
            nbytes = self._small.pop(key)
            self._small_bytes -= nbytes
        else:
            nbytes = self._main.pop(key)
        self.used_bytes -= nbytes

    def _evict(self) -> str:
        while True:
            if self._small and (self._small_bytes >= SMALL_FRACTION * self.capacity_bytes or not self._main):
                key, nbytes = self._small.popitem(last=False)
                self._small_bytes -= nbytes
                if self._freq[key] > 0:  # asked for again while small: promoted
                    self._freq[key] = 0
                    self._main[key] = nbytes
                    continue
                self._remember(key, nbytes)
            else:
                key, nbytes = self._main.popitem(last=False)
                if self._freq[key] > 0:  # a second chance per hit
                    self._freq[key] -= 1
                    self._main[key] = nbytes
                    continue
            del self._freq[key]
            self.used_bytes -= nbytes
            return key

    def _remember(self, key: str, nbytes: int) -> None:
        self._ghost[key] = nbytes
        self._ghost_bytes += nbytes
        while self._ghost_bytes > GHOST_BUDGETS * self.capacity_bytes:
            self._ghost_bytes -= self._ghost.popitem(last=False)[1]


class LRU:
    """The baseline S3-FIFO is measured against; same interface."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def touch(self, key: str) -> None:
        if key in self._entries:
            self._entries.move_to_end(key)

    def insert(self, key: str, nbytes: int) -> list[str]:
        if key in self._entries:
            return []
        if nbytes > self.capacity_bytes:
            return [key]
        evicted = []
        while self.used_bytes + nbytes > self.capacity_bytes:
            old, size = self._entries.popitem(last=False)
            self.used_bytes -= size
            evicted.append(old)
        self._entries[key] = nbytes
        self.used_bytes += nbytes
        return evicted

    def remove(self, key: str) -> None:
        nbytes = self._entries.pop(key, None)
        if nbytes is not None:
            self.used_bytes -= nbytes
