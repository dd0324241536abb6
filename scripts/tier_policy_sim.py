"""Hit ratios of the tier eviction policies (services/worker/kv/policy.py) on chat-like traces.

Each conversation is `chunks` chunks of equal size; a visit reads all of its chunks (in order),
inserting what is missing, as a tier sees a returning conversation. The budget holds `capacity`
conversations. Prints the share of chunk reads that hit, per policy and trace:

    .venv/bin/python scripts/tier_policy_sim.py
"""

import random

from services.worker.kv.policy import LRU, S3FIFO

CHUNKS = 10


def cyclic(n: int, rounds: int, rng: random.Random) -> list[int]:
    """Round-robin revisits of n conversations (scenario 11's pattern)."""
    return [c for _ in range(rounds) for c in range(n)]


def zipf(n: int, visits: int, rng: random.Random) -> list[int]:
    weights = [1 / (i + 1) for i in range(n)]
    return rng.choices(range(n), weights, k=visits)


def hot_and_scan(hot: int, visits: int, rng: random.Random) -> list[int]:
    """A hot set revisited while one-time conversations stream past (a crawler, a batch job)."""
    trace, fresh = [], hot
    for _ in range(visits):
        if rng.random() < 0.5:
            trace.append(rng.randrange(hot))
        else:
            trace.append(fresh)
            fresh += 1
    return trace


def hit_ratio(policy, trace: list[int]) -> float:
    hits = reads = 0
    for conv in trace:
        for chunk in range(CHUNKS):
            key = f"{conv}/{chunk}"
            reads += 1
            if key in policy:
                hits += 1
                policy.touch(key)
            else:
                policy.insert(key, 1)
    return hits / reads


def main() -> None:
    rng = random.Random(0)
    capacity = 16 * CHUNKS
    traces = {
        "cyclic 32 convs, 4 rounds (budget 16)": cyclic(32, 4, rng),
        "cyclic 20 convs, 4 rounds (budget 16)": cyclic(20, 4, rng),
        "zipf 200 convs, 2000 visits (budget 16)": zipf(200, 2000, rng),
        "hot 12 + one-time scan, 2000 visits (budget 16)": hot_and_scan(12, 2000, rng),
    }
    print(f"| trace | LRU | S3-FIFO |\n|---|---|---|")
    for name, trace in traces.items():
        lru, s3 = hit_ratio(LRU(capacity), trace), hit_ratio(S3FIFO(capacity), trace)
        print(f"| {name} | {lru:.1%} | {s3:.1%} |")


if __name__ == "__main__":
    main()
