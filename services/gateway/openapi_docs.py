"""What /openapi.json says the gateway's routes answer: content types (SSE, Prometheus text) and
every error status, with the body each error has."""

from typing import Any, Literal

from pydantic import BaseModel, Field

from services.common.schemas import GenerateResult


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    """The error body of the gateway's own routes."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(BaseModel):
    """The error body of every /v1 route (OpenAI's shape)."""

    error: OpenAIErrorDetail


_WHY = {
    400: "Invalid request (for /v1 also a body that fails validation), or a prompt too long for the model.",
    401: "GATEWAY_API_KEYS is set and the request has no valid `Authorization: Bearer` key.",
    404: "Not found: no such sequence, or a model (model, model_name) that is not served.",
    409: "The sequence is busy with another request.",
    408: "The request body did not arrive whole within GATEWAY_BODY_TIMEOUT_S.",
    413: "The request body is larger than GATEWAY_MAX_BODY_BYTES.",
    422: "The body or a parameter fails validation.",
    429: "The worker's queue is full; retry after Retry-After seconds.",
    502: "A worker or the coordinator answered something invalid, or broke off.",
    503: "No worker (or the coordinator) is available; retry after Retry-After seconds.",
}


def errors(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    model = OpenAIErrorBody if openai else ErrorBody
    return {status: {"description": _WHY[status], "model": model} for status in statuses}


def sse_event(data: dict) -> dict:
    """The schema of one Server-Sent Event (OpenAPI 3.2's reading of a text/event-stream schema)."""
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


GENERATE_EVENT = sse_event({
    "type": "string", "contentMediaType": "application/json",
    "description": "One event as JSON: start, token, then done or error.",
    "contentSchema": {"type": "object", "required": ["type"],
                      "properties": {"type": {"enum": ["start", "token", "done", "error"]}}}})
OPENAI_CHUNK_EVENT = sse_event({"type": "string", "description": "A chunk as JSON; the last event is `[DONE]`."})


def sse_or_json(model: type[BaseModel], event_schema: dict, description: str) -> dict[int | str, dict[str, Any]]:
    """200 as Server-Sent Events (`stream: true`) or one JSON object (`stream: false`)."""
    return {200: {"description": description, "model": model,
                  "content": {"text/event-stream": {"schema": event_schema}}}}


GENERATE_RESPONSES = sse_or_json(
    GenerateResult, GENERATE_EVENT, "Events start, token..., then done or error; the result itself when stream is false."
) | errors(400, 401, 404, 408, 409, 413, 422, 429, 502, 503)

METRICS_RESPONSES = {200: {"description": "Prometheus text exposition format."}}


# --- /v1: OpenAI's response objects, as this gateway fills them ---

class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV was reused (OpenAI's prompt-caching field)


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class TextLogprobs(BaseModel):
    """OpenAI's legacy shape; with echo, the first prompt token has null logprobs."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: CompletionUsage


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[TextChoice]
    usage: CompletionUsage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(description="The model this name stands for (WORKER_MODEL_NAME).")
    parent: None = None
    max_model_len: int | None = Field(None, description="The model's window, in tokens (prompt and output).")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


_CHUNKS = ("`chat.completion.chunk` / `text_completion` chunks, with stream_options.include_usage a last "
           "chunk with the usage, then `data: [DONE]`; the whole object when stream is false. The "
           "X-Session-Id header names the routing key used.")
V1_ERRORS = errors(400, 401, 404, 408, 413, 429, 502, 503, openai=True)
CHAT_RESPONSES = sse_or_json(ChatCompletion, OPENAI_CHUNK_EVENT, _CHUNKS) | V1_ERRORS
COMPLETION_RESPONSES = sse_or_json(TextCompletion, OPENAI_CHUNK_EVENT, _CHUNKS) | V1_ERRORS
