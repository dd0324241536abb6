"""Stateless requests through the engine with the real tiny-gpt2 preset: automatic prefix caching
(adopt the previous turn's entry, copy a shared prefix, sessions as read-only sources), stop
strings, the reuse switch, eviction, and the counters. Every cached output is compared with
generation from scratch (an engine with reuse off, or plain transformers)."""

import itertools

import pytest

from services.worker.chat_template import chat_prompt_ids
from services.worker.engine.engine import Engine
from services.worker.engine.sequence import Request, SamplingParams
from services.worker.kv.store import STATELESS_KEY_PREFIX
from services.worker.kv.prefix_index import BLOCK_TOKENS
from tests.unit.test_engine import hf_model  # noqa: F401 - a fixture
from tests.unit.test_engine import Collector, encode, generate, hf_greedy, make_engine, wait_idle

SYSTEM = ("You are a careful assistant for a distributed KV-cache serving system. Answer briefly "
          "and name the setting. ") * 2
_names = itertools.count()


def complete(engine: Engine, prompt_ids: list[int], max_tokens: int = 12, stop: tuple[str, ...] = (),
             temperature: float = 0.0) -> Collector:
    sink = Collector()
    engine.submit(Request(seq_id=f"req-{next(_names)}", token_ids=list(prompt_ids), prompt_tokens=len(prompt_ids),
                          sink=sink, stateless=True,
                          params=SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop)))
    return sink.wait()


def chat(engine: Engine, messages: list[dict]) -> list[int]:
    return chat_prompt_ids(engine.tokenizer, messages)


def stateless_keys(engine: Engine) -> list[str]:
    with engine.lock:
        return [k for k, e in engine.store.entries.items() if e.stateless]


@pytest.fixture
def engine(loaded_tiny):
    with make_engine(loaded_tiny) as eng:
        yield eng


@pytest.fixture
def reference(loaded_tiny):
    """Recomputes every prompt from scratch."""
    with make_engine(loaded_tiny, enable_kv_reuse=False) as eng:
        yield eng


def test_a_six_turn_chat_adopts_its_previous_turn_and_matches_recompute(engine, reference, hf_model):
    messages = [{"role": "system", "content": SYSTEM}]
    previous = None
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question {turn}: which setting bounds the KV cache?"})
        prompt = chat(engine, messages)
        cached, fresh = complete(engine, prompt), complete(reference, prompt)
        assert cached.token_ids == fresh.token_ids, turn
        assert fresh.start["cached_tokens"] == 0
        assert cached.start["context_tokens"] == cached.done["usage"]["prompt_tokens"] == len(prompt)
        if previous is not None:  # everything but the previous turn's last token (never fed)
            assert cached.start["cached_tokens"] == previous + 12 - 1, turn
            assert len(stateless_keys(engine)) == 1  # adopted: the same entry, no copy
        previous = len(prompt)
        messages.append({"role": "assistant", "content": cached.done["text"]})
    assert cached.token_ids == hf_greedy(hf_model, prompt, 12)


def test_a_shared_system_prompt_is_copied_and_the_source_is_kept(engine, reference):
    first = chat(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I scale out?"}])
    second = chat(engine, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does a drain do?"}])
    a = complete(engine, first)
    b = complete(engine, second)
    common = next(i for i, (x, y) in enumerate(zip(first, second)) if x != y)
    assert common == len(f"<|system|>\n{SYSTEM}<|end|>\n<|user|>\n")  # byte-level: a token per character
    assert b.start["cached_tokens"] == common  # exact, past the last full block
    assert b.token_ids == complete(reference, second).token_ids
    assert len(stateless_keys(engine)) == 2  # copied into a new entry; the source is intact
    again = complete(engine, first + a.token_ids + encode(engine, " more"))
    assert again.start["cached_tokens"] == len(first) + len(a.token_ids) - 1  # the first one adopts its own
    assert engine.stats()["stateless_sequences"] == 2


def test_the_same_prompt_twice_copies_all_but_its_last_position(engine, hf_model):
    prompt = encode(engine, SYSTEM)
    one, two = complete(engine, prompt), complete(engine, prompt)
    assert one.start["cached_tokens"] == 0
    assert two.start["cached_tokens"] == len(prompt) - 1  # the last position gives the logits
    assert one.token_ids == two.token_ids == hf_greedy(hf_model, prompt, 12)


def test_a_session_is_a_read_only_source(engine, reference):
    session = generate(engine, "sess", SYSTEM, max_tokens=8)
    wait_idle(engine)
    with engine.lock:
        entry = engine.store.get("sess")
        ids_before, kv_before = list(entry.token_ids), entry.kv.data[:, :, :, :entry.num_cached].clone()
    prompt = encode(engine, SYSTEM) + session.token_ids[:3] + encode(engine, " and then?")
    result = complete(engine, prompt)
    assert result.start["cached_tokens"] == len(SYSTEM) + 3
    assert result.token_ids == complete(reference, prompt).token_ids
    with engine.lock:
        assert entry.token_ids == ids_before and entry.kv.data[:, :, :, :len(ids_before)].equal(kv_before)
    nxt = generate(engine, "sess", " next", max_tokens=4)  # the session still continues from all of it
    assert nxt.start["cached_tokens"] == len(ids_before)


def test_stop_strings_end_generation_and_never_reach_the_stream(engine):
    prompt = encode(engine, SYSTEM)
    full = complete(engine, prompt, max_tokens=30).done["text"]
    stop = full[10:14]
    assert full.index(stop) == 10, "pick a stop string that first occurs at position 10"
    result = complete(engine, prompt, max_tokens=30, stop=("zzzz-never", stop))
    pieces = [e["token"] for e in result.events if e["type"] == "token"]
    assert result.done["finish_reason"] == "stop"
    assert result.done["text"] == "".join(pieces) == full[:10]
    assert not any(stop in piece for piece in pieces)
    assert len(result.token_ids) == 14  # byte-level: the stop's last byte ended it
    assert result.done["usage"]["completion_tokens"] == 14
    unstopped = complete(engine, prompt, max_tokens=30, stop=("zzzz-never",))
    assert unstopped.done["finish_reason"] == "length" and unstopped.done["text"] == full


def test_disabled_reuse_reuses_nothing_and_keeps_no_stateless_entry(reference):
    prompt = encode(reference, SYSTEM)
    for _ in range(2):
        assert complete(reference, prompt).start["cached_tokens"] == 0
    wait_idle(reference)
    stats = reference.stats()
    assert stats["stateless_sequences"] == 0 and stats["kv_bytes_used"] == 0
    assert stats["prefix_cache_queries"] == 0 and stats["prefix_cache_hits"] == 0


def test_prefix_cache_counters_count_tokens(engine):
    prompt = encode(engine, SYSTEM)
    complete(engine, prompt)
    second = complete(engine, prompt)
    generate(engine, "s", "a session prompt", max_tokens=2)
    stats = engine.stats()
    assert stats["prefix_cache_queries"] == 2 * len(prompt) + len("a session prompt")
    assert stats["prefix_cache_hits"] == second.start["cached_tokens"] == len(prompt) - 1
    assert stats["stateless_requests"] == 2 and stats["new_sequences"] == 1


def test_stateless_entries_are_evicted_and_forgotten_under_the_budget(loaded_tiny, reference):
    bpt = loaded_tiny.layout.bytes_per_token
    budget = 3 * 256 * bpt
    prompts = [encode(reference, f"{i}: " + SYSTEM) for i in range(6)]  # 202 tokens + 12: 256 capacity
    with make_engine(loaded_tiny, budget_bytes=budget) as engine:
        for prompt in prompts:
            assert complete(engine, prompt).token_ids == complete(reference, prompt).token_ids
        stats = engine.stats()
        assert stats["evictions"] >= 3 and stats["kv_bytes_peak"] <= budget
        assert stats["stateless_sequences"] == stats["cached_sequences"] <= 3  # no KV, no entry
        assert stats["prefix_indexed_sequences"] == stats["stateless_sequences"]
        last = complete(engine, prompts[-1])  # most recent: still cached
        assert last.start["cached_tokens"] == len(prompts[-1]) - 1


def test_a_copy_that_cannot_fit_beside_its_source_recomputes(loaded_tiny, reference):
    bpt = loaded_tiny.layout.bytes_per_token
    prompt = encode(reference, SYSTEM)
    with make_engine(loaded_tiny, budget_bytes=256 * bpt) as engine:  # room for one sequence
        complete(engine, prompt)
        other = prompt[:100] + encode(engine, " something else")
        result = complete(engine, other)  # source and copy cannot coexist: no copy, no deadlock
        assert result.start["cached_tokens"] == 0
        assert result.token_ids == complete(reference, other).token_ids
        assert engine.stats()["kv_bytes_peak"] <= 256 * bpt


def test_stateless_entries_are_never_exported_nor_waited_for_by_a_drain(engine):
    complete(engine, encode(engine, SYSTEM))
    generate(engine, "sess", "a session", max_tokens=2)
    wait_idle(engine)
    (key,) = stateless_keys(engine)
    assert key.startswith(STATELESS_KEY_PREFIX)
    assert engine.pin_for_export(key) is None
    assert engine.num_cached_sequences() == 1  # the session only
    assert engine.pin_for_export("sess") is not None
    engine.unpin("sess")


def test_an_imported_session_is_a_source(engine, reference):
    with make_engine(engine.loaded) as old_owner:
        generate(old_owner, "src", SYSTEM, max_tokens=2)
        wait_idle(old_owner)
        ids, kv = old_owner.pin_for_export("src")
        n = engine.import_kv("moved", ids, kv[:, :, :, :len(ids)].clone(), reserve_tokens=len(ids))
        old_owner.unpin("src")
    assert n == len(ids) and engine.stats()["prefix_indexed_sequences"] == 1
    prompt = ids + encode(engine, " and?")
    result = complete(engine, prompt)
    assert result.start["cached_tokens"] == len(ids)
    assert result.token_ids == complete(reference, prompt).token_ids


def test_block_granularity_of_matches(engine):
    short = encode(engine, "x" * (BLOCK_TOKENS - 1))
    complete(engine, short, max_tokens=1)
    # Less than one block in common with anything: nothing to find.
    assert complete(engine, short + encode(engine, "y"), max_tokens=1).start["cached_tokens"] == 0
