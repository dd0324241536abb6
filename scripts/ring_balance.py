"""Measures the candidate ring-balance methods the coordinator could use, on the same worker ids:
the largest key-space share over the mean, the keys a join moves (as a multiple of the ideal
1/(N+1)), the build time, and one lookup's time. The chosen method (services/common/hash_ring.py:
many points in flat numpy arrays) is measured through its real class; the others are written here.

    python scripts/ring_balance.py --workers 4 16 100 1000

Bounded loads (GATEWAY_LOAD_FACTOR) is not a row: it balances requests in flight, not the key
space, so it does not change a ring's shares; the gateway applies it on top of whichever ring.
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.common.hash_ring import HashRing, hash_key, points_of  # noqa: E402

KEYS = [f"conv-{i}" for i in range(20_000)]
MAGLEV_M = 65_537


def plain(workers: list[str], vnodes: int) -> dict:
    t0 = time.perf_counter()
    ring = HashRing.of(workers, vnodes)
    build_s = time.perf_counter() - t0
    grown = HashRing.of([*workers, "new-worker"], vnodes)
    t0 = time.perf_counter()
    before = [ring.owner(k) for k in KEYS]
    lookup_s = (time.perf_counter() - t0) / len(KEYS)
    moved = sum(a != grown.owner(k) for a, k in zip(before, KEYS))
    return {"share": max(ring.shares().values()) * len(workers), "moved": moved / len(KEYS) * (len(workers) + 1),
            "build_ms": build_s * 1000, "lookup_us": lookup_s * 1e6}


def weighted(workers: list[str], base: int = 256, iterations: int = 4) -> dict:
    """Fewer points, each worker's count fitted to even out shares (a function of the whole set)."""
    def build(ws):
        counts = np.full(len(ws), base)
        for _ in range(iterations + 1):
            hashes = np.concatenate([points_of(w, 4 * base)[:c] for w, c in zip(ws, counts)])
            owners = np.repeat(np.arange(len(ws)), counts)
            order = np.argsort(hashes, kind="stable")
            hashes, owners = hashes[order].astype(np.int64), owners[order]
            shares = np.bincount(owners, weights=np.diff(hashes, prepend=hashes[-1] - 2**32), minlength=len(ws)) / 2**32
            counts = np.clip(np.round(counts / len(ws) / shares), base // 4, 4 * base).astype(int)
        return hashes, owners, shares
    t0 = time.perf_counter()
    hashes, owners, shares = build(workers)
    build_s = time.perf_counter() - t0
    hashes2, owners2, _ = build([*workers, "new-worker"])
    key_hashes = np.array([hash_key(k) for k in KEYS])
    a = np.array(workers)[owners[np.searchsorted(hashes, key_hashes) % len(hashes)]]
    b = np.array([*workers, "new-worker"])[owners2[np.searchsorted(hashes2, key_hashes) % len(hashes2)]]
    return {"share": shares.max() * len(workers), "moved": (a != b).mean() * (len(workers) + 1),
            "build_ms": build_s * 1000, "lookup_us": None}


def maglev(workers: list[str]) -> dict:
    """Eisenbud et al. 2016: each worker fills its next preferred free slot in turn."""
    def build(ws):
        ws = sorted(ws)
        digests = [hashlib.md5(w.encode()).digest() for w in ws]
        offsets = [int.from_bytes(d[:4], "big") % MAGLEV_M for d in digests]
        skips = [int.from_bytes(d[4:8], "big") % (MAGLEV_M - 1) + 1 for d in digests]
        nexts, table, filled = [0] * len(ws), [-1] * MAGLEV_M, 0
        while True:
            for i in range(len(ws)):
                j = nexts[i]
                slot = (offsets[i] + j * skips[i]) % MAGLEV_M
                while table[slot] >= 0:
                    j += 1
                    slot = (offsets[i] + j * skips[i]) % MAGLEV_M
                table[slot], nexts[i], filled = i, j + 1, filled + 1
                if filled == MAGLEV_M:
                    return [ws[t] for t in table]
    t0 = time.perf_counter()
    table = build(workers)
    build_s = time.perf_counter() - t0
    grown = build([*workers, "new-worker"])
    counts = np.unique(table, return_counts=True)[1]
    moved = sum(table[hash_key(k) % MAGLEV_M] != grown[hash_key(k) % MAGLEV_M] for k in KEYS)
    return {"share": counts.max() / (MAGLEV_M / len(workers)), "moved": moved / len(KEYS) * (len(workers) + 1),
            "build_ms": build_s * 1000, "lookup_us": None}


def rendezvous(workers: list[str]) -> dict:
    """Highest random weight: every key scores every worker (vectorised), O(N) a lookup."""
    seeds = np.array([int.from_bytes(hashlib.md5(w.encode()).digest()[:8], "big") for w in workers], np.uint64)

    def owner(key: str, seeds: np.ndarray) -> int:
        with np.errstate(over="ignore"):
            x = seeds ^ np.uint64(hash_key(key) * 0x9E3779B97F4A7C15 % 2**64)
            x = (x ^ (x >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(29)
        return int(np.argmax(x))
    t0 = time.perf_counter()
    before = [owner(k, seeds) for k in KEYS]
    lookup_s = (time.perf_counter() - t0) / len(KEYS)
    grown = np.append(seeds, np.uint64(int.from_bytes(hashlib.md5(b"new-worker").digest()[:8], "big")))
    moved = sum(a != owner(k, grown) for a, k in zip(before, KEYS))
    counts = np.bincount(before, minlength=len(workers))
    # The key-space share is exactly 1/N in expectation; the sampled keys add their own noise.
    return {"share": counts.max() / (len(KEYS) / len(workers)), "moved": moved / len(KEYS) * (len(workers) + 1),
            "build_ms": 0.0, "lookup_us": lookup_s * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 16, 100, 1000])
    args = parser.parse_args()
    methods = [("vnodes 100", lambda ws: plain(ws, 100)), ("vnodes 2000", lambda ws: plain(ws, 2000)),
               ("vnodes 8192 (chosen)", lambda ws: plain(ws, 8192)), ("weighted 256 fitted", weighted),
               ("Maglev M=65537", maglev), ("rendezvous", rendezvous)]
    print("| method | N | max/mean share | keys moved by a join (x ideal) | build ms | lookup µs |")
    print("|---|---|---|---|---|---|")
    for n in args.workers:
        workers = [f"worker-{i}" for i in range(n)]
        for name, method in methods:
            r = method(workers)
            lookup = "-" if r["lookup_us"] is None else f"{r['lookup_us']:.1f}"
            print(f"| {name} | {n} | {r['share']:.3f} | {r['moved']:.2f} | {r['build_ms']:.0f} | {lookup} |", flush=True)


if __name__ == "__main__":
    main()
