"""Conversations driven as a careful client would, and the exact accounting of their histories.

Each turn carries an Idempotency-Key and is retried with the same key until it is settled: a
`done` (the client was told it succeeded), or a 409 `duplicate_turn` whose outcome says it was
stored (the client learns it by asking). After the faults, every history must hold each settled
turn exactly once, nothing the client did not send, and no prompt without its turn in the log.
"""

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from services.common.sse import parse_events

RETRY_PAUSE_S = 0.2
COUNTS: Counter = Counter()  # summed over the suite; printed at the end of the run (conftest)


@dataclass
class Target:
    """Where the clients send: a gateway's URL, which a test may change (a gateway replaced)."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Ledger:
    attempted: dict[str, list[str]] = field(default_factory=dict)    # seq_id -> keys, in order
    told_done: dict[str, dict[str, int]] = field(default_factory=dict)  # seq_id -> key -> completion tokens
    learned: dict[str, set[str]] = field(default_factory=dict)       # keys whose outcome came from a 409
    outcomes: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, outcome: str) -> None:
        with self.lock:
            self.outcomes[outcome] += 1


def attempt(client: httpx.Client, target: Target, seq_id: str, key: str, prompt: str, max_tokens: int) -> tuple:
    """One try: ("done", completion_tokens), ("stored", turn) from a duplicate_turn 409, or
    ("retry", why)."""
    body = {"prompt": prompt, "seq_id": seq_id, "max_tokens": max_tokens, "temperature": 0}
    try:
        with client.stream("POST", f"{target.url}/generate", json=body,
                           headers={**target.headers, "Idempotency-Key": key}) as response:
            if response.status_code != 200:
                response.read()
                error = response.json().get("error", {})
                turn = error.get("turn")
                if error.get("type") == "duplicate_turn" and turn["state"] == "completed":
                    return "stored", turn
                return "retry", f"{response.status_code} {error.get('type')}" + (f" {turn['state']}" if turn else "")
            events = list(parse_events(response.iter_lines()))
    except httpx.HTTPError as exc:
        return "retry", type(exc).__name__
    if events and events[-1]["type"] == "done":
        return "done", events[-1]["usage"]["completion_tokens"]
    return "retry", f"stream ended with {events[-1]['error']['type'] if events else 'nothing'}"


def converse(target: Target, ledger: Ledger, seq_id: str, stop: threading.Event, *, max_turns: int,
             deadline_s: float, max_tokens: int = 12) -> None:
    """Turns until `stop` (or max_turns); each retried with its key until settled or the deadline."""
    with httpx.Client(timeout=30.0) as client:
        for t in range(max_turns):
            if stop.is_set():
                return
            key = f"{seq_id}-k{t}"
            with ledger.lock:
                ledger.attempted.setdefault(seq_id, []).append(key)
            while True:
                kind, detail = attempt(client, target, seq_id, key, f" turn {t}.", max_tokens)
                ledger.note(kind if kind != "retry" else f"retry: {detail}")
                if kind == "done":
                    with ledger.lock:
                        ledger.told_done.setdefault(seq_id, {})[key] = detail
                    break
                if kind == "stored":
                    with ledger.lock:
                        ledger.learned.setdefault(seq_id, set()).add(key)
                    break
                if time.monotonic() > deadline_s:
                    return  # unsettled: the check still requires at most one copy of it
                time.sleep(RETRY_PAUSE_S)


def run_conversations(target: Target, seq_ids: list[str], faults, *, max_turns: int = 20,
                      budget_s: float = 60.0) -> Ledger:
    """Drives the conversations in threads while `faults()` runs in this thread; then lets them
    finish their turns in flight."""
    ledger, stop = Ledger(), threading.Event()
    deadline = time.monotonic() + budget_s
    threads = [threading.Thread(target=converse, args=(target, ledger, s, stop),
                                kwargs={"max_turns": max_turns, "deadline_s": deadline}, daemon=True)
               for s in seq_ids]
    for thread in threads:
        thread.start()
    try:
        faults()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic() + 35.0))
    assert not any(thread.is_alive() for thread in threads), "a client did not finish"
    return ledger


def outcomes_of(target: Target, seq_id: str) -> dict | None:
    with httpx.Client(timeout=10.0) as client:
        response = client.get(f"{target.url}/sequences/{seq_id}", headers=target.headers)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return response.json()


def check_histories(target: Target, ledger: Ledger, settle_s: float = 8.0) -> None:
    """Exact accounting of every conversation: waits (bounded) for open turns to settle first."""
    for seq_id, keys in ledger.attempted.items():
        deadline = time.monotonic() + settle_s
        while (seen := outcomes_of(target, seq_id)) is not None and seen["open_turn"]:
            assert time.monotonic() < deadline, f"{seq_id}: a turn is still open after {settle_s} s"
            time.sleep(0.25)
        check_history(seq_id, keys, ledger.told_done.get(seq_id, {}), ledger.learned.get(seq_id, set()), seen)


def check_history(seq_id: str, attempted: list[str], told: dict[str, int], learned: set[str],
                  seen: dict | None) -> None:
    turns = seen["turns"] if seen else []
    ids = [t["turn_id"] for t in turns]
    stored = {t["turn_id"]: t for t in turns}
    lost = [key for key in [*told, *learned] if key not in stored]
    duplicated = len(ids) - len(set(ids))
    COUNTS["histories checked"] += 1
    COUNTS["turns told done"] += len(told)
    COUNTS["turns learned by lookup"] += len(learned)
    COUNTS["lost"] += len(lost)
    COUNTS["duplicated"] += duplicated
    assert not lost and not duplicated, f"{seq_id}: lost {lost}, duplicated ids in {ids}"
    assert set(ids) <= set(attempted), f"{seq_id}: turns nobody sent: {set(ids) - set(attempted)}"
    assert ids == [key for key in attempted if key in stored], f"{seq_id}: out of order: {ids}"
    for key, completion in told.items():
        assert stored[key]["state"] == "completed" and stored[key]["completion_tokens"] == completion, \
            (seq_id, key, stored[key], completion)
    # No prompt or answer outside the log: the history is exactly its turns, end to end.
    history = sum(t["prompt_tokens"] + t["completion_tokens"] for t in turns)
    assert history == (seen["history_tokens"] if seen else 0), f"{seq_id}: {seen}"
