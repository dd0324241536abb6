"""Which idle sequences hold KV for a prefix of some token ids (no torch here).

A sequence's cached ids are cut into blocks of `block_tokens`; block i's hash chains the hash of
block i-1 with block i's ids, so one hash names a whole prefix. The index maps each hash to the
keys holding that prefix. A lookup walks the query's block hashes as far as they are present,
then asks the caller for each candidate's exact common prefix with the query: that verifies the
match (hashes may collide) and may reach past the last full block.
"""

from collections.abc import Callable, Sequence
from itertools import islice

BLOCK_TOKENS = 16
MAX_CANDIDATES = 8  # verified at the deepest matching block, most recently indexed first


def block_hashes(token_ids: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """One chained hash per full block of `token_ids`."""
    hashes, prev = [], 0
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        prev = hash((prev, tuple(token_ids[start:start + block_tokens])))
        hashes.append(prev)
    return hashes


class PrefixIndex:
    def __init__(self, block_tokens: int = BLOCK_TOKENS):
        self.block_tokens = block_tokens
        self._keys_by_hash: dict[int, dict[str, None]] = {}  # insertion-ordered sets
        self._hashes_by_key: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self._hashes_by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._hashes_by_key

    def update(self, key: str, token_ids: Sequence[int]) -> None:
        """`key` now holds KV for exactly `token_ids` (replaces what it held before)."""
        self.remove(key)
        hashes = block_hashes(token_ids, self.block_tokens)
        if not hashes:
            return
        self._hashes_by_key[key] = hashes
        for h in hashes:
            self._keys_by_hash.setdefault(h, {})[key] = None

    def remove(self, key: str) -> None:
        for h in self._hashes_by_key.pop(key, ()):
            keys = self._keys_by_hash.get(h, {})
            keys.pop(key, None)  # a collision may repeat a hash within one key
            if not keys:
                self._keys_by_hash.pop(h, None)

    def longest_match(self, token_ids: Sequence[int],
                      common_prefix: Callable[[str], int]) -> tuple[str, int] | None:
        """The key sharing the longest verified prefix with `token_ids` and that prefix's length
        (at least one block), or None. `common_prefix(key)`: the exact number of leading ids
        `key` holds in common with `token_ids`."""
        hashes = block_hashes(token_ids, self.block_tokens)
        depth = 0
        while depth < len(hashes) and hashes[depth] in self._keys_by_hash:
            depth += 1
        for d in range(depth, 0, -1):  # a collision at depth d falls back to shallower blocks
            best = self._best_at(hashes[d - 1], d * self.block_tokens, common_prefix)
            if best is not None:
                return best
        return None

    def _best_at(self, h: int, min_len: int, common_prefix: Callable[[str], int]) -> tuple[str, int] | None:
        best = None
        for key in list(islice(reversed(self._keys_by_hash[h]), MAX_CANDIDATES)):
            n = common_prefix(key)
            if n >= min_len and (best is None or n > best[1]):
                best = (key, n)
        return best
