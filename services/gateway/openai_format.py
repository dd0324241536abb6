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


@dataclass
class _Reply:
    """One response's identity, shared by its body or all its chunks."""

    model: str
    include_usage: bool = False
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = self._envelope(self.chunk_object, choices)
        if self.include_usage:
            chunk["usage"] = None  # every chunk but the last, as OpenAI does
        return chunk

    def usage_chunk(self, usage: dict) -> dict:
        return self._chunk([]) | {"usage": usage_object(usage)}

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.id_prefix}-{uuid.uuid4().hex}"

    chunk_object = ""
    id_prefix = ""


@dataclass
class ChatReply(_Reply):
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def result(self, done: dict) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": done["text"]},
                  "logprobs": None, "finish_reason": done["finish_reason"]}
        return self._envelope("chat.completion", [choice]) | {"usage": usage_object(done["usage"])}

    def opening_chunk(self) -> dict | None:
        return self._delta({"role": "assistant", "content": ""})

    def text_chunk(self, text: str) -> dict:
        return self._delta({"content": text})

    def final_chunk(self, finish_reason: str) -> dict:
        return self._delta({}, finish_reason)

    def _delta(self, delta: dict, finish_reason: str | None = None) -> dict:
        return self._chunk([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}])


@dataclass
class TextReply(_Reply):
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def result(self, done: dict) -> dict:
        choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}
        return self._envelope("text_completion", [choice]) | {"usage": usage_object(done["usage"])}

    def opening_chunk(self) -> dict | None:
        return None

    def text_chunk(self, text: str) -> dict:
        return self._text(text)

    def final_chunk(self, finish_reason: str) -> dict:
        return self._text("", finish_reason)

    def _text(self, text: str, finish_reason: str | None = None) -> dict:
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}])


Reply = ChatReply | TextReply


def model_object(model_id: str, created: int, root: str | None = None, max_model_len: int | None = None) -> dict:
    """OpenAI's model object with vLLM's additions: `root` (the model a served name stands for)
    and `max_model_len` (its window, in tokens)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "kvcache",
            "root": root or model_id, "parent": None, "max_model_len": max_model_len}
