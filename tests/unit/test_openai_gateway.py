"""The gateway's pure OpenAI pieces: request validation and translation, the routing key, and the
response shapes built from a worker's result."""

import pytest
from pydantic import ValidationError

from services.common.errors import InvalidRequest, ModelNotFound, Overloaded
from services.gateway.openai_format import ChatReply, TextReply, openai_error_body, openai_status
from services.gateway.openai_schemas import ChatCompletionRequest, CompletionRequest
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
    {"n": 2}, {"tools": []}, {"logprobs": True}, {"presence_penalty": 0.5}, {"response_format": {"type": "json_object"}},
    {"seed": False}, {"max_tokens": True}, {"max_tokens": "5"}, {"temperature": "0"}, {"temperature": 3},
    {"top_p": 0}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""}, {"stream": "yes"}, {"seed": 2**53},
])
def test_unsupported_or_invalid_parameters_are_rejected(extra):
    with pytest.raises(ValidationError):
        chat(**extra)


def test_no_op_values_of_unsupported_parameters_are_accepted():
    request = chat(n=1, logprobs=False, presence_penalty=0, frequency_penalty=0, user="u", max_tokens=3.0)
    assert request.for_worker().max_tokens == 3  # JSON Schema: 3.0 is an integer


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
