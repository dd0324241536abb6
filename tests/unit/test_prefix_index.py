"""Prefix index: chained block hashes, longest match verified against the real ids (collisions),
exact lengths past the last full block, update and removal."""

from services.worker.kv import prefix_index
from services.worker.kv.store import common_prefix_len
from services.worker.kv.prefix_index import BLOCK_TOKENS, PrefixIndex, block_hashes

B = BLOCK_TOKENS


def ids(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


class Held:
    """What the KV store plays: the ids each key really holds."""

    def __init__(self):
        self.index = PrefixIndex()
        self.ids: dict[str, list[int]] = {}

    def put(self, key: str, token_ids: list[int]) -> None:
        self.ids[key] = token_ids
        self.index.update(key, token_ids)

    def match(self, query: list[int]):
        return self.index.longest_match(query, lambda key: common_prefix_len(self.ids[key], query))


def test_block_hashes_chain_whole_prefixes():
    a = block_hashes(ids(3 * B + 5))
    assert len(a) == 3  # full blocks only
    b = block_hashes(ids(B) + [999] + ids(2 * B - 1, start=B + 1))
    assert a[0] == b[0] and a[1] != b[1] and a[2] != b[2]  # one change alters every later hash
    swapped = block_hashes(ids(B, start=B) + ids(B))
    assert set(swapped).isdisjoint(block_hashes(ids(2 * B)))  # blocks hash with their position
    assert block_hashes(ids(B - 1)) == []


def test_longest_match_picks_the_longest_and_reports_the_exact_length():
    held = Held()
    held.put("short", ids(2 * B))
    held.put("long", ids(4 * B + 7))
    held.put("other", ids(5 * B, start=1000))
    assert held.match(ids(6 * B)) == ("long", 4 * B + 7)  # past the last full block
    assert held.match(ids(3 * B) + [5000] * B) == ("long", 3 * B)
    assert held.match(ids(2 * B + 3)) == ("long", 2 * B + 3)  # the query ends first
    assert held.match(ids(5 * B, start=1000)) == ("other", 5 * B)
    assert held.match(ids(B - 1)) is None  # less than a block: nothing
    assert held.match([7] * (3 * B)) is None


def test_a_match_needs_one_whole_block_in_common():
    held = Held()
    held.put("a", ids(3 * B))
    assert held.match(ids(B - 1) + [999] + ids(2 * B)) is None  # differs inside block 0
    assert held.match(ids(B) + [999] * B) == ("a", B)


def depth_only_hash(monkeypatch):
    """The worst hash: block i of every sequence collides with block i of every other."""
    monkeypatch.setattr(prefix_index, "hash", lambda value: value[0] + 1, raising=False)


def test_hash_collisions_are_verified_against_the_real_ids(monkeypatch):
    depth_only_hash(monkeypatch)
    held = Held()
    held.put("a", ids(3 * B))
    held.put("b", ids(3 * B, start=500))
    # Depth 3 is "present" for any 3-block query; only b's real ids share its first 2 blocks.
    assert held.match(ids(2 * B, start=500) + [1] * B) == ("b", 2 * B)
    assert held.match(ids(3 * B)) == ("a", 3 * B)
    assert held.match([7] * (3 * B)) is None  # collides everywhere, matches nowhere


def test_a_collision_at_the_deepest_block_falls_back_to_a_shallower_real_match(monkeypatch):
    depth_only_hash(monkeypatch)
    held = Held()
    held.put("real", ids(B) + [1] * B)
    held.put("liar", [9] * (2 * B))
    # Depth 2 is found (through both, by collision) but verifies for neither: depth 1 does.
    assert held.match(ids(B) + [2] * B) == ("real", B)
    held.index.remove("real")
    held.index.remove("liar")
    assert held.index._keys_by_hash == {}


def test_update_replaces_and_remove_forgets():
    held = Held()
    held.put("a", ids(3 * B))
    held.put("a", ids(3 * B, start=100))  # the entry now holds something else
    assert held.match(ids(3 * B)) is None
    assert held.match(ids(3 * B, start=100)) == ("a", 3 * B)
    held.index.remove("a")
    assert "a" not in held.index and len(held.index) == 0
    assert held.match(ids(3 * B, start=100)) is None
    assert held.index._keys_by_hash == {}  # nothing left behind
    held.index.remove("never-added")  # harmless
    held.index.update("tiny", ids(B - 1))  # no full block: not indexed at all
    assert "tiny" not in held.index


def test_shared_prefix_keys_survive_each_others_removal():
    held = Held()
    system = ids(2 * B)
    held.put("conv1", system + ids(B, start=100))
    held.put("conv2", system + ids(B, start=200))
    held.index.remove("conv1")
    assert held.match(system + ids(B, start=100)) == ("conv2", 2 * B)
    assert held.match(system + ids(B, start=200)) == ("conv2", 3 * B)


def test_ties_go_to_the_most_recently_indexed():
    held = Held()
    held.put("old", ids(2 * B))
    held.put("new", ids(2 * B))
    assert held.match(ids(3 * B)) == ("new", 2 * B)
    held.put("old", ids(2 * B))  # re-indexed: now the most recent
    assert held.match(ids(3 * B)) == ("old", 2 * B)
