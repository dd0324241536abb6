"""The gateway's pure OpenAI pieces: request validation and translation, the routing key, and the
response shapes built from a worker's result."""

import pytest
from pydantic import ValidationError

from services.common.errors import InvalidRequest, ModelNotFound, Overloaded
from services.gateway.openai_format import ChatReply, TextReply, openai_error_body, openai_status
from services.gateway.openai_schemas import NO_OP_PARAMETERS, ChatCompletionRequest, CompletionRequest
from services.gateway.session_key import chat_opening, prompt_opening, session_key

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
DONE = {"text": "Hello", "finish_reason": "stop",
        "usage": {"prompt_tokens": 40, "cached_tokens": 32, "completion_tokens": 3, "context_tokens": 40}}


def chat(**extra) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(CHAT | extra)


# --- requests -------------------------------------------------------------------------------
def test_chat_request_becomes_the_workers_stateless_request():
    worker = chat(messages=[{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                  max_tokens=5, max_completion_tokens=7, temperature=0, stop="\n", seed=3, stream=True).for_worker()
    assert [(m.role, m.content) for m in worker.messages] == [("system", "Be brief."), ("user", "ab")]
    assert (worker.max_tokens, worker.temperature, worker.stop, worker.seed, worker.stream) == (7, 0.0, ["\n"], 3, True)
    assert chat().for_worker().max_tokens == 16 and chat().for_worker().temperature == 1.0


def test_completion_prompt_may_be_a_list_of_one_string():
    request = CompletionRequest.model_validate({"model": "m", "prompt": ["abc"], "stop": ["x", "y"]})
    assert request.for_worker().prompt == "abc" and request.for_worker().stop == ["x", "y"]
    for prompt in (["a", "b"], [1, 2, 3], [], ""):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": prompt})


@pytest.mark.parametrize("extra", [
    {"n": 17}, {"n": 0}, {"tools": []}, {"logprobs": 1}, {"top_logprobs": 2}, {"top_logprobs": 21, "logprobs": True},
    {"presence_penalty": 2.5}, {"response_format": {"type": "json_object"}}, {"echo": True}, {"top_k": -2},
    {"min_p": 1.1}, {"repetition_penalty": 0}, {"min_tokens": -1}, {"ignore_eos": 1}, {"stop_token_ids": [-1]},
    {"stream_options": {"continuous_usage_stats": "yes"}}, {"best_of": 2}, {"use_beam_search": True},
    {"logit_bias": {"5": 1}}, {"priority": 1}, {"service_tier": "flex"},
    {"seed": False}, {"max_tokens": True}, {"max_tokens": "5"}, {"temperature": "0"}, {"temperature": 3},
    {"top_p": 0}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""}, {"stream": "yes"}, {"seed": 2**53},
])
def test_unsupported_or_invalid_parameters_are_rejected(extra):
    with pytest.raises(ValidationError):
        chat(**extra)


def test_an_unknown_parameter_is_named():
    with pytest.raises(ValidationError) as error:
        chat(typo_param=1)
    assert "typo_param" in str(error.value)


def test_the_no_ops_are_accepted_and_change_nothing():
    request = chat(n=1, user="u", store=True, service_tier="auto", metadata={"a": "b"}, use_beam_search=False,
                   length_penalty=1, logit_bias={}, priority=0, max_tokens=3.0)
    assert request.for_worker() == chat(max_tokens=3).for_worker()  # JSON Schema: 3.0 is an integer
    assert set(NO_OP_PARAMETERS) - {"best_of", "suffix"} <= set(ChatCompletionRequest.model_fields)
    assert {"best_of", "suffix"} <= set(CompletionRequest.model_fields)


def test_vllms_sampling_parameters_reach_the_worker():
    worker = chat(top_k=5, min_p=0.1, min_tokens=2, ignore_eos=True, repetition_penalty=1.2, presence_penalty=0.5,
                  frequency_penalty=-0.5, stop_token_ids=[7], include_stop_str_in_output=True,
                  skip_special_tokens=False, spaces_between_special_tokens=False, n=3, seed=1,
                  logprobs=True, top_logprobs=4).for_worker()
    assert (worker.top_k, worker.min_p, worker.min_tokens, worker.ignore_eos, worker.repetition_penalty) == \
        (5, 0.1, 2, True, 1.2)
    assert (worker.presence_penalty, worker.frequency_penalty, worker.stop_token_ids) == (0.5, -0.5, [7])
    assert worker.include_stop_str_in_output and not worker.skip_special_tokens
    assert not worker.spaces_between_special_tokens
    assert (worker.n, worker.seed, worker.logprobs, worker.prompt_logprobs) == (3, 1, 4, None)
    assert chat(logprobs=True).for_worker().logprobs == 0 and chat(logprobs=False).for_worker().logprobs is None
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "p", "logprobs": 3, "echo": True})
    assert (completion.for_worker().logprobs, completion.for_worker().prompt_logprobs) == (3, 3)
    with pytest.raises(InvalidRequest) as too_many:  # the worker's check: a 400, as vLLM answers
        chat(min_tokens=10, max_tokens=5).for_worker().check_min_tokens(5)
    assert too_many.value.param == "min_tokens"


def test_guidellms_request_is_accepted():
    """GuideLLM 0.8.1 sends ignore_eos and stream_options.continuous_usage_stats with every request."""
    request = chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True},
                   max_tokens=8, max_completion_tokens=8, stop=None, ignore_eos=True)
    assert request.continuous_usage() and request.for_worker().ignore_eos
    assert not chat(stream=True, stream_options={"continuous_usage_stats": True}).continuous_usage()  # vLLM's


def test_usage_is_included_only_in_a_stream_that_asks():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage()
    assert not chat(stream=False, stream_options={"include_usage": True}).include_usage()
    assert not chat(stream=True).include_usage()


# --- routing key ----------------------------------------------------------------------------
def test_the_key_is_the_header_when_given():
    assert session_key("my-session", "m", ["anything"]) == "my-session"
    with pytest.raises(InvalidRequest) as bad:
        session_key("no spaces", "m", [])
    assert bad.value.param == "X-Session-Id"


def test_every_turn_of_a_chat_has_the_same_key_and_other_chats_do_not():
    turn1 = [("system", "S"), ("user", "first")]
    turn3 = turn1 + [("assistant", "a1"), ("user", "second"), ("assistant", "a2"), ("user", "third")]
    assert chat_opening(turn3) == chat_opening(turn1) == ["system:S", "user:first"]
    key = session_key(None, "m", chat_opening(turn1))
    assert key == session_key(None, "m", chat_opening(turn3)) and key.startswith("conv-")
    assert key != session_key(None, "m", chat_opening([("system", "S"), ("user", "other")]))
    assert key != session_key(None, "other-model", chat_opening(turn1))


def test_a_completion_is_keyed_by_its_prompts_opening():
    base = "x" * 256
    assert session_key(None, "m", prompt_opening(base + "one")) == session_key(None, "m", prompt_opening(base + "two"))
    assert session_key(None, "m", prompt_opening("a" + base)) != session_key(None, "m", prompt_opening(base))


# --- responses ------------------------------------------------------------------------------
def test_chat_result_and_chunks_have_openais_shape():
    reply = ChatReply(model="m", include_usage=True)
    body = reply.result(DONE)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello"},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43,
                             "prompt_tokens_details": {"cached_tokens": 32}}
    chunks = [reply.opening_chunk(), reply.text_chunk("He"), reply.final_chunk("length"), reply.usage_chunk(DONE["usage"])]
    assert {c["id"] for c in chunks} == {body["id"]} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "He"} and chunks[1]["usage"] is None
    assert chunks[2]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 43


def test_text_completion_result_and_chunks():
    reply = TextReply(model="m")
    assert reply.result(DONE)["choices"][0] == {"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "stop"}
    assert reply.opening_chunk() is None
    chunk = reply.text_chunk("He")
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "He" and "usage" not in chunk


def test_errors_in_openais_shape():
    missing = ModelNotFound("model 'x' is not served here", param="model")
    assert openai_error_body(missing) == {"error": {"message": "model 'x' is not served here",
                                                    "type": "invalid_request_error", "param": "model",
                                                    "code": "model_not_found"}}
    assert openai_status(missing) == 404
    busy = Overloaded("queue full", retry_after_s=1)
    assert openai_error_body(busy)["error"]["type"] == "overloaded" and openai_status(busy) == 429


ENTRY = {"token": "He", "logprob": -0.5, "top_logprobs": [{"token": "He", "logprob": -0.5}, {"token": "A", "logprob": -1.0}]}
PROMPT_ENTRY = {"token": "P", "logprob": None, "top_logprobs": None}


def test_completion_logprobs_and_echo_in_openais_shape():
    done = DONE | {"text": "HeHe", "logprobs": [ENTRY, ENTRY],
                   "prompt_logprobs": [PROMPT_ENTRY, ENTRY | {"token": "Q", "logprob": -2.0}]}
    choice = TextReply(model="m", logprobs=True, echo="PQ").result(done)["choices"][0]
    assert choice["text"] == "PQHeHe"
    assert choice["logprobs"] == {"tokens": ["P", "Q", "He", "He"], "token_logprobs": [None, -2.0, -0.5, -0.5],
                                  "top_logprobs": [None, {"He": -0.5, "A": -1.0, "Q": -2.0},
                                                   {"He": -0.5, "A": -1.0}, {"He": -0.5, "A": -1.0}],
                                  "text_offset": [0, 1, 2, 4]}
    assert TextReply(model="m").result(done)["choices"][0]["logprobs"] is None
    chunk = TextReply(model="m", logprobs=True).text_chunk("He", 2, [ENTRY], offset=6)
    assert chunk["choices"][0]["index"] == 2 and chunk["choices"][0]["logprobs"]["text_offset"] == [6]


def test_chat_logprobs_in_openais_shape():
    choice = ChatReply(model="m", logprobs=True).result(DONE | {"logprobs": [ENTRY]})["choices"][0]
    assert choice["logprobs"] == {"content": [{"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [
        {"token": "He", "logprob": -0.5, "bytes": [72, 101]}, {"token": "A", "logprob": -1.0, "bytes": [65]}]}]}


def test_n_choices_and_continuous_usage():
    done = DONE | {"choices": [DONE | {"index": 0}, DONE | {"index": 1, "text": "Bye", "finish_reason": "length"}]}
    body = ChatReply(model="m", n=2).result(done)
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == \
        [(0, "Hello", "stop"), (1, "Bye", "length")]
    reply = ChatReply(model="m", include_usage=True, continuous_usage=True)
    usage = {"prompt_tokens": 40, "cached_tokens": 0, "completion_tokens": 2}
    assert reply.text_chunk("x", usage=usage)["usage"]["total_tokens"] == 42
    assert ChatReply(model="m", include_usage=True).text_chunk("x", usage=usage)["usage"] is None
