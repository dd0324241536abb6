"""The gateway's OpenAI-compatible API through the real `openai` package, against real processes on
loopback (a coordinator, two tiny-gpt2 workers, gateways)."""

import httpx
import openai
import pytest

from tests.support import extra_gateway

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt2"
KEYS = "first-key-0123456789,second-key-9876543210"
MESSAGES = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Which service owns the hash ring?"}]


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def api(cluster) -> openai.OpenAI:
    return client(cluster.gateway_url)


@pytest.fixture(scope="module")
def keyed_gateway(cluster, tmp_path_factory):
    with extra_gateway(cluster, tmp_path_factory.mktemp("keyed"), GATEWAY_API_KEYS=KEYS) as url:
        yield url


def test_models_lists_the_served_names(api):
    """The e2e cluster serves tiny-gpt2 as WORKER_SERVED_MODEL_NAME=tiny-gpt2,gpt2."""
    assert [m.id for m in api.models.list().data] == ["gpt2", MODEL]
    model = api.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "kvcache")
    alias = api.models.retrieve("gpt2")
    assert alias.root == MODEL and alias.max_model_len == 1024  # tiny-gpt2's window
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4o")
    reply = api.completions.create(model="gpt2", prompt="Hello", max_tokens=2)
    assert reply.model == "gpt2" and reply.usage.completion_tokens == 2


def test_vllm_server_routes(cluster, api):
    """/tokenize counts what /v1 counts as the prompt, /detokenize inverts it, /reset_prefix_cache
    makes the next identical request recompute, /version, and X-Request-Id on every response."""
    url = cluster.gateway_url
    reply = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    tokenized = httpx.post(f"{url}/tokenize", json={"model": "gpt2", "messages": MESSAGES}, timeout=30).json()
    assert tokenized["count"] == reply.usage.prompt_tokens and tokenized["max_model_len"] == 1024
    text = httpx.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}, timeout=30).json()["prompt"]
    assert MESSAGES[1]["content"] in text

    again = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    reset = httpx.post(f"{url}/reset_prefix_cache", headers={"X-Request-Id": "reset-1"}, timeout=30)
    assert reset.status_code == 200 and reset.headers["x-request-id"] == "reset-1"
    assert reset.json()["num_workers"] == 2 and reset.json()["dropped_entries"] >= 1
    after = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
    assert after.usage.prompt_tokens_details.cached_tokens == 0
    assert after.choices[0].message.content == reply.choices[0].message.content

    version = httpx.get(f"{url}/version", timeout=10)
    assert version.json()["version"] and len(version.headers["x-request-id"]) == 32


def test_chat_streamed_equals_not_streamed(api):
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    reply = raw.parse()
    assert raw.headers["x-session-id"].startswith("conv-")
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == 10 or reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    chunks = list(api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                              stream=True))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked for


def test_streamed_usage_comes_last_when_asked(api):
    chunks = list(api.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=4,
                                              temperature=0, stream=True, stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.prompt_tokens_details.cached_tokens <= last.usage.prompt_tokens
    assert all(c.usage is None for c in body)


def test_completions_streamed_and_not(api):
    reply = api.completions.create(model=MODEL, prompt="The coordinator keeps", max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.usage.completion_tokens == 8
    assert reply.usage.prompt_tokens == len("The coordinator keeps")  # byte-level tokenizer
    streamed = api.completions.create(model=MODEL, prompt="The coordinator keeps", max_tokens=8, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_a_stop_sequence_ends_the_answer_before_it(api):
    prompt = "Workers hold the KV cache of"
    full = api.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0).choices[0].text
    assert len(full) >= 10
    stop = full[6:9]
    expected = full[:full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = list(api.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                 stop=[stop, "never-appears"], stream=True))
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            choice = api.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                            stop=stop).choices[0]
            text, reason = choice.text, choice.finish_reason
        assert (text, reason) == (expected, "stop")


def test_unsupported_parameters_are_400_in_openais_shape(api):
    with pytest.raises(openai.BadRequestError) as n17:
        api.chat.completions.create(model=MODEL, messages=MESSAGES, n=17)
    assert n17.value.body["param"] == "n" and n17.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as unknown:
        api.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"guided_json": {}})
    assert unknown.value.body["param"] == "guided_json"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as tools:
        api.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[tool])
    assert tools.value.body["param"] == "tools"
    assert tools.value.body["message"] == "tools: not a supported parameter"
    with pytest.raises(openai.BadRequestError) as seed:
        api.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"seed": False})
    assert seed.value.body["param"] == "seed"
    with pytest.raises(openai.NotFoundError) as model:
        api.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert model.value.body["code"] == "model_not_found"


# --- vLLM's sampling parameters through the SDK (each is compared with transformers in tests/unit) ---
PROMPT = "The coordinator keeps"


def test_chat_logprobs_with_top_logprobs_streamed_and_not(api):
    reply = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert len(token.top_logprobs) == 3
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    chunks = list(api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=3, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_completion_logprobs_with_echo_score_the_prompt(api):
    """lm-evaluation-harness's log-likelihood request: max_tokens 1, logprobs, echo."""
    reply = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2, echo=True)
    choice = reply.choices[0]
    assert choice.text.startswith(PROMPT)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == reply.usage.prompt_tokens + 1 == len(PROMPT) + 1  # byte-level tokenizer
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(logprobs.tokens[i] in logprobs.top_logprobs[i] for i in range(1, len(logprobs.tokens)))
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    streamed = list(api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2,
                                           echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert tokens[0] is None and tokens[1:] == pytest.approx(logprobs.token_logprobs[1:], abs=1e-5)


def reused_tokens(cluster) -> int:
    return httpx.get(f"{cluster.gateway_url}/stats", timeout=10).json()["totals"]["reused_tokens"]


def test_n_choices_share_the_prompt_and_a_seed_repeats_them(api, cluster):
    prompt = PROMPT * 8
    before = reused_tokens(cluster)
    reply = api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, n=3, seed=11)
    assert reused_tokens(cluster) - before >= 2 * (len(prompt) - 1)  # choices 1 and 2 copied choice 0's prompt KV
    texts = [c.text for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert reply.usage.completion_tokens == 24
    again = api.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, n=3, seed=11)
    assert [c.text for c in again.choices] == texts
    chunks = list(api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=1.0, n=2,
                                              seed=3, stream=True))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_vllm_sampling_parameters_in_extra_body(api):
    def text(**extra) -> str:
        return api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body=extra).choices[0].text

    greedy = text()
    assert text(top_k=1, temperature=1.0, seed=2) == greedy
    assert text(repetition_penalty=2.0) != greedy
    assert text(min_p=0.05, top_k=40, ignore_eos=True, min_tokens=4, skip_special_tokens=True,
                spaces_between_special_tokens=True) == greedy
    stop = greedy[3:5]
    assert text(stop=[stop], include_stop_str_in_output=True) == greedy[:greedy.index(stop) + 2]
    stopped = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                     extra_body={"stop_token_ids": [ord(greedy[2])]}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == greedy[:greedy.index(greedy[2])]


def test_guidellms_streams_with_continuous_usage_succeed(api):
    """GuideLLM 0.8.1 sends ignore_eos and stream_options.continuous_usage_stats with every request."""
    chunks = list(api.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, max_completion_tokens=6, stream=True, stop=None,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, extra_body={"ignore_eos": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 6
    assert all(c.usage is not None for c in body)
    counts = [c.usage.completion_tokens for c in body]
    assert counts == sorted(counts) and counts[-1] == 6
    assert {c.usage.prompt_tokens for c in chunks} == {last.usage.prompt_tokens}


def test_api_keys_guard_every_route_but_health_and_metrics(keyed_gateway):
    with pytest.raises(openai.AuthenticationError):
        client(keyed_gateway, api_key="wrong").models.list()
    for key in KEYS.split(","):
        reply = client(keyed_gateway, api_key=key).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens == 2
    assert httpx.post(f"{keyed_gateway}/generate", json={"prompt": "a"}).status_code == 401
    assert httpx.get(f"{keyed_gateway}/openapi.json").status_code == 401
    assert httpx.get(f"{keyed_gateway}/health").status_code == 200
    assert httpx.get(f"{keyed_gateway}/metrics").status_code == 200


def stateless_requests(cluster) -> dict[str, int]:
    workers = httpx.get(f"{cluster.gateway_url}/stats", timeout=10).json()["workers"]
    return {name: stats["stateless_requests"] for name, stats in workers.items()}


def test_round_robin_spreads_one_conversation_over_the_workers(cluster, tmp_path):
    with extra_gateway(cluster, tmp_path, GATEWAY_ROUTING="round_robin") as url:
        before = stateless_requests(cluster)
        for _ in range(4):
            client(url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, temperature=0)
        after = stateless_requests(cluster)
    assert sorted(after[name] - before[name] for name in after) == [2, 2]
