"""OpenAI's response shapes, built from a worker's events and result (pure: no I/O).

A worker's `done` event (or `stream: false` body) carries `text`, `finish_reason` and `usage`
({prompt_tokens, cached_tokens, completion_tokens, ...}); its `token` events carry the released
text in `token`. Here they become `chat.completion` / `text_completion` objects and their chunks.
"""

import time
import uuid
from dataclasses import dataclass, field

from services.common.errors import ServiceError

OPENAI_PREFIX = "/v1"
DONE_LINE = b"data: [DONE]\n\n"  # the end of every OpenAI stream


def is_openai_path(path: str) -> bool:
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def openai_error_body(exc: ServiceError) -> dict:
    """{"error": {"message", "type", "param", "code"}}: a client error is an
    `invalid_request_error` whose code says which (e.g. `model_not_found`); a server-side one
    keeps its own type (`overloaded`, `unavailable`, `upstream_error`, ...)."""
    client_error = exc.status_code < 500 and exc.status_code != 429
    return {"error": {"message": exc.message,
                      "type": "invalid_request_error" if client_error else exc.error_type,
                      "param": exc.param, "code": exc.error_type}}


def openai_status(exc: ServiceError) -> int:
    return 400 if exc.status_code == 422 else exc.status_code  # OpenAI answers 400 to a bad body


def usage_object(usage: dict) -> dict:
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}


def text_logprobs(entries: list[dict], offset: int = 0) -> dict:
    """/v1/completions' logprobs object from the worker's entries ({token, logprob, top_logprobs});
    `top_logprobs` holds the alternatives and the chosen token (vLLM's); `offset`: where the first
    token's text starts in the choice's text."""
    body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        body["tokens"].append(entry["token"])
        body["token_logprobs"].append(entry["logprob"])
        top = entry["top_logprobs"]
        body["top_logprobs"].append(None if top is None else
                                    {t["token"]: t["logprob"] for t in top} | {entry["token"]: entry["logprob"]})
        body["text_offset"].append(offset)
        offset += len(entry["token"])
    return body


def chat_logprobs(entries: list[dict]) -> dict:
    """/v1/chat/completions' logprobs object: {content: [{token, logprob, bytes, top_logprobs}]}."""
    def token(entry: dict) -> dict:
        return {"token": entry["token"], "logprob": entry["logprob"], "bytes": list(entry["token"].encode())}
    return {"content": [token(e) | {"top_logprobs": [token(t) for t in e["top_logprobs"]]} for e in entries]}


def worker_choices(done: dict) -> list[dict]:
    """A worker's result or `done` as its list of choices (n > 1 carries `choices`)."""
    return done.get("choices") or [done | {"index": 0}]


@dataclass
class _Reply:
    """One response's identity and options, shared by its body or all its chunks."""

    model: str
    include_usage: bool = False
    continuous_usage: bool = False  # every chunk carries the usage so far (vLLM's continuous_usage_stats)
    logprobs: bool = False
    n: int = 1
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = self._envelope(self.chunk_object, choices)
        if self.include_usage:
            # null on every chunk but the last, as OpenAI does; the usage so far with continuous_usage
            chunk["usage"] = usage_object(usage) if usage is not None and self.continuous_usage else None
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        return self._chunk([]) | {"usage": usage_object(usage)}

    def result(self, done: dict) -> dict:
        choices = [self._choice(c, done) for c in worker_choices(done)]
        return self._envelope(self.result_object, choices) | {"usage": usage_object(done["usage"])}

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.id_prefix}-{uuid.uuid4().hex}"

    chunk_object = ""
    result_object = ""
    id_prefix = ""


@dataclass
class ChatReply(_Reply):
    chunk_object = "chat.completion.chunk"
    result_object = "chat.completion"
    id_prefix = "chatcmpl"

    def _choice(self, choice: dict, done: dict) -> dict:
        logprobs = chat_logprobs(choice.get("logprobs", [])) if self.logprobs else None
        return {"index": choice["index"], "message": {"role": "assistant", "content": choice["text"]},
                "logprobs": logprobs, "finish_reason": choice["finish_reason"]}

    def opening_chunk(self, index: int = 0, usage: dict | None = None) -> dict | None:
        return self._delta(index, {"role": "assistant", "content": ""}, usage=usage)

    def text_chunk(self, text: str, index: int = 0, entries: list[dict] | None = None, offset: int = 0,
                   usage: dict | None = None) -> dict:
        logprobs = chat_logprobs(entries) if entries is not None else None
        return self._delta(index, {"content": text}, logprobs=logprobs, usage=usage)

    def final_chunk(self, finish_reason: str, index: int = 0, usage: dict | None = None) -> dict:
        return self._delta(index, {}, finish_reason, usage=usage)

    def _delta(self, index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None,
               usage: dict | None = None) -> dict:
        return self._chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
                           usage)


@dataclass
class TextReply(_Reply):
    chunk_object = "text_completion"
    result_object = "text_completion"
    id_prefix = "cmpl"
    echo: str | None = None  # the prompt, returned before each choice's text

    def _choice(self, choice: dict, done: dict) -> dict:
        text = choice["text"] if self.echo is None else self.echo + choice["text"]
        logprobs = None
        if self.logprobs:
            prompt = worker_choices(done)[0].get("prompt_logprobs", []) if self.echo is not None else []
            logprobs = text_logprobs(prompt + choice.get("logprobs", []))
        return {"index": choice["index"], "text": text, "logprobs": logprobs, "finish_reason": choice["finish_reason"]}

    def opening_chunk(self, index: int = 0, usage: dict | None = None) -> dict | None:
        return None

    def text_chunk(self, text: str, index: int = 0, entries: list[dict] | None = None, offset: int = 0,
                   usage: dict | None = None) -> dict:
        logprobs = text_logprobs(entries, offset) if entries is not None else None
        return self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}], usage)

    def final_chunk(self, finish_reason: str, index: int = 0, usage: dict | None = None) -> dict:
        return self._chunk([{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}], usage)


Reply = ChatReply | TextReply


def model_object(model_id: str, created: int, root: str | None = None, max_model_len: int | None = None) -> dict:
    """OpenAI's model object with vLLM's additions: `root` (the model a served name stands for)
    and `max_model_len` (its window, in tokens)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "kvcache",
            "root": root or model_id, "parent": None, "max_model_len": max_model_len}
