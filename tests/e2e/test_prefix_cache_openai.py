"""Automatic prefix caching seen through the real `openai` client: a stateless chat that resends
its whole history reuses the KV of its earlier turns, a shared system prompt is reused by another
conversation, and the greedy output equals a cluster that recomputes everything."""

import openai
import pytest

from tests.support import start_cluster

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt2"
BLOCK = 16  # the prefix index's granularity: a match may fall short by up to one block
SYSTEM = ("You are a careful assistant for a distributed KV-cache serving system. Answer briefly, "
          "cite the configuration setting by name, and never invent a setting that does not exist. "
          "Prefer examples that run on a laptop without a GPU. ")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One worker that recomputes every prompt (no KV reuse at all)."""
    cluster = start_cluster(tmp_path_factory.mktemp("no-reuse"), num_workers=1, WORKER_ENABLE_KV_REUSE="false")
    yield cluster
    cluster.stop()


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(api: openai.OpenAI, messages: list[dict], session: str, stream: bool) -> tuple[str, object]:
    """One greedy turn; returns the reply and the usage (from the final chunk when streamed)."""
    args = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                extra_headers={"X-Session-Id": session})
    if not stream:
        reply = api.chat.completions.create(**args)
        return reply.choices[0].message.content, reply.usage
    text, usage = "", None
    for chunk in api.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    return text, usage


def test_six_turn_chat_reuses_its_history_and_matches_recompute(cluster, reference):
    cached_api, fresh_api = client(cluster.gateway_url), client(reference.gateway_url)
    messages = [{"role": "system", "content": SYSTEM}]
    previous = None
    for turn in range(6):
        messages.append({"role": "user", "content": f"Question {turn}: which setting bounds the KV cache?"})
        stream = turn % 2 == 1
        reply, usage = ask(cached_api, messages, "six-turns", stream)
        expected, fresh_usage = ask(fresh_api, messages, "six-turns", stream)
        assert reply == expected, f"turn {turn + 1}: cached output differs from recompute"
        assert usage.prompt_tokens == fresh_usage.prompt_tokens
        assert fresh_usage.prompt_tokens_details.cached_tokens == 0
        cached = usage.prompt_tokens_details.cached_tokens
        if previous is not None:  # turns 2-6: the previous turn's prompt and answer are cached
            assert cached >= previous.prompt_tokens + previous.completion_tokens - BLOCK, (turn + 1, cached)
            assert cached < usage.prompt_tokens
        previous = usage
        messages.append({"role": "assistant", "content": reply})


def test_a_shared_system_prompt_is_copied_into_another_conversation(cluster, reference):
    cached_api, fresh_api = client(cluster.gateway_url), client(reference.gateway_url)
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How do I scale out?"}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does a drain do?"}]
    # One session key for both: the same worker, as two conversations of one client would be.
    ask(cached_api, first, "shared-system", stream=False)
    reply, usage = ask(cached_api, second, "shared-system", stream=False)
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached >= len(SYSTEM) - BLOCK  # byte-level tokenizer: one token per character
    assert cached < usage.prompt_tokens - len("What does a drain do?")  # the user message differs
    assert reply == ask(fresh_api, second, "shared-system", stream=False)[0]


def test_every_turn_without_a_session_header_reaches_the_conversations_worker(cluster):
    """The default routing key hashes the model, the system message and the first user message,
    which every turn resends: the same key each turn, so the KV of the earlier turns is found."""
    api = client(cluster.gateway_url)
    messages = [{"role": "system", "content": "Routing without a header."},
                {"role": "user", "content": "Where does my next turn go?"}]
    keys, previous = set(), None
    for turn in range(4):
        raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6,
                                                             temperature=0)
        reply = raw.parse()
        keys.add(raw.headers["x-session-id"])
        if previous is not None:
            cached = reply.usage.prompt_tokens_details.cached_tokens
            assert cached >= previous.prompt_tokens + previous.completion_tokens - BLOCK, (turn + 1, cached)
        previous = reply.usage
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"And turn {turn + 2}?"}]
    assert len(keys) == 1
