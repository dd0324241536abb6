"""Wire schemas shared by the services (one definition per message)."""

import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from services.common.errors import InvalidRequest

SEQ_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
WORKER_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
MAX_TOKENS_LIMIT = 4096
MAX_SEED = 2**53 - 1  # JSON's largest exact integer: a larger bound rounds up in a schema's float
_SEQ_ID_RE = re.compile(SEQ_ID_PATTERN)


def _no_bool_or_string(value: object) -> object:
    """JSON Schema's integer and number: 3 and 3.0 are both integers, true and "3" are neither."""
    if isinstance(value, (bool, str)):
        raise ValueError("Input should be a JSON number, not a boolean or a string")
    return value


NotBoolOrString = BeforeValidator(_no_bool_or_string)
# The constraints come before the validator, or they do not reach the JSON schema of an optional field.
Seed = Annotated[int, Field(ge=0, le=MAX_SEED), NotBoolOrString]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), NotBoolOrString]
Temperature = Annotated[float, Field(ge=0.0, le=2.0), NotBoolOrString]
TopP = Annotated[float, Field(gt=0.0, le=1.0), NotBoolOrString]
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
TopK = Annotated[int, Field(ge=-1, le=1_000_000), NotBoolOrString]
MinP = Annotated[float, Field(ge=0.0, le=1.0), NotBoolOrString]
MinTokens = Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT), NotBoolOrString]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=100.0), NotBoolOrString]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0), NotBoolOrString]  # OpenAI's presence/frequency range
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1), NotBoolOrString]
NumLogprobs = Annotated[int, Field(ge=0, le=MAX_LOGPROBS), NotBoolOrString]


def check_seq_id(seq_id: str, name: str = "seq_id") -> None:
    """For a seq_id (or a key of the same alphabet) taken from a URL path or a header; bodies are
    checked by their schema."""
    if not _SEQ_ID_RE.fullmatch(seq_id):
        raise InvalidRequest(f"{name} must be 1-128 characters of [A-Za-z0-9._:-]",
                             param=None if name == "seq_id" else name)


class SamplingFields(BaseModel):
    """vLLM's sampling parameters that /generate and the worker's /completions share (their
    meaning: the README's API contract)."""

    top_k: TopK = Field(0, description="Sample from the k most likely tokens; 0 or -1: all.")
    min_p: MinP = Field(0.0, description="Drop tokens less likely than min_p times the most likely.")
    min_tokens: MinTokens = Field(0, description="No EOS, stop token or stop string ends the generation before this many tokens.")
    ignore_eos: StrictBool = Field(False, description="Generate past the EOS token.")
    repetition_penalty: RepetitionPenalty = Field(1.0, description="Over the prompt and the generated tokens (1: none).")
    presence_penalty: Penalty = Field(0.0, description="Subtracted from each generated token's logit.")
    frequency_penalty: Penalty = Field(0.0, description="Times each generated token's count, subtracted from its logit.")
    stop_token_ids: list[TokenId] = Field([], max_length=MAX_STOP_TOKEN_IDS,
                                          description="Tokens that end the generation, as the EOS does.")
    include_stop_str_in_output: StrictBool = Field(False, description="Keep the stop string or stop token's text.")
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    logprobs: NumLogprobs | None = Field(None, description=f"Each generated token's log-probability and up to "
                                                           f"{MAX_LOGPROBS} most likely alternatives.")

    def check_min_tokens(self, max_tokens: int) -> None:
        """A 400, as vLLM answers (not in the JSON schema: it relates two fields)."""
        if self.min_tokens > max_tokens:
            raise InvalidRequest(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
                                 param="min_tokens")

    def sampling_kwargs(self) -> dict:
        """The engine's SamplingParams fields set here."""
        fields = self.model_dump(include=set(SamplingFields.model_fields))
        return fields | {"stop_token_ids": tuple(self.stop_token_ids), "top_k": max(self.top_k, 0)}


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1)
    seq_id: str | None = Field(None, pattern=SEQ_ID_PATTERN)
    max_tokens: TokenCount = 50
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    model_name: str | None = None
    stream: StrictBool = True
    seed: Seed | None = None


class WorkerRef(BaseModel):
    worker_id: str
    address: str


class Usage(BaseModel):
    prompt_tokens: int
    cached_tokens: int
    handoff_tokens: int = 0  # of cached_tokens, positions whose KV came from another worker
    tier_tokens: int = 0  # of cached_tokens, positions loaded from the host, disk or shared KV tiers
    completion_tokens: int
    context_tokens: int


class Timings(BaseModel):
    ttft_ms: float
    prefill_ms: float
    decode_ms: float


class GenerateResult(BaseModel):
    """The `done` event's fields, also the body of a `stream: false` response."""

    seq_id: str
    worker_id: str
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings
    # /generate only, the reference implementation's names: text, and usage.completion_tokens
    generated_text: str | None = None
    tokens_generated: int | None = None


class Resume(BaseModel):
    """Continue a turn whose stream broke (its worker died): sent by the gateway to the new owner."""

    model_config = ConfigDict(extra="forbid")

    turn_id: str = Field(..., min_length=1, max_length=128)  # the broken attempt's request_id
    # The broken attempt's `start.context_tokens` (None if no start event was received).
    context_tokens: int | None = Field(None, ge=1)
    generated_ids: list[int] = Field([], max_length=MAX_TOKENS_LIMIT)  # already sent to the client


class WorkerGenerateRequest(GenerateRequest):
    """What the gateway sends a worker: the public request plus routing context. Workers are
    reachable only from the gateway and each other (NetworkPolicy), so these fields are trusted."""

    request_id: str | None = Field(None, min_length=1, max_length=128)  # also the turn id
    # With API keys, seq_id is the cluster's id for the tenant's sequence (gateway.tenants) and
    # this the client's, which the events name.
    public_seq_id: str | None = Field(None, pattern=SEQ_ID_PATTERN)
    handoff_sources: list[WorkerRef] = Field([], max_length=16)
    resume: Resume | None = None


ModelName = Annotated[str, Field(min_length=1, max_length=256)]


class RegisterRequest(BaseModel):
    worker_id: str = Field(..., pattern=WORKER_ID_PATTERN)
    address: str = Field(..., min_length=1, max_length=512, pattern=r"^https?://")
    model_name: str | None = None
    # The names clients may use for the model (WORKER_SERVED_MODEL_NAME); empty: model_name.
    served_model_names: list[ModelName] = Field([], max_length=16)
    max_model_len: int | None = Field(None, ge=1)  # the model's window, in tokens
    # A worker that registers while draining (the coordinator restarted meanwhile) stays off the ring.
    draining: bool = False


class HeartbeatRequest(BaseModel):
    worker_id: str = Field(..., pattern=WORKER_ID_PATTERN)
    # Requests in progress at the worker (admitted, not yet finished): routers balance on it.
    load: int | None = Field(None, ge=0)


class DeregisterRequest(BaseModel):
    worker_id: str = Field(..., pattern=WORKER_ID_PATTERN)


class DrainRequest(BaseModel):
    worker_id: str = Field(..., pattern=WORKER_ID_PATTERN)



class RingWorker(BaseModel):
    worker_id: str
    address: str
    model_name: str | None = None
    state: Literal["active", "draining"]
    age_s: float                  # since it registered
    last_heartbeat_age_s: float
    load: int = 0                 # its last reported load (requests in progress)
    load_reports: int = 0         # how many load reports it sent: a new one resets a router's estimate
    served_model_names: list[str] = []
    max_model_len: int | None = None

    def model_names(self) -> list[str]:
        """What clients may call its model: the served names, else the model's own name."""
        return self.served_model_names or ([self.model_name] if self.model_name else [])


class RingChange(BaseModel):
    """One ring change of the handoff window: the workers it turned on (true) or off (false)."""
    seq: int
    toggles: list[tuple[str, bool]]
    num_active_before: int


class LoadReport(BaseModel):
    worker_id: str
    load: int
    load_reports: int


class RingState(BaseModel):
    """Everything a router needs to route without asking, or what changed since it last asked
    (`full` false): changed workers, removed ones, new ring changes. Loads travel in their own
    list with their own version, so a load report moves no membership data."""

    instance: str  # the coordinator process: versions of another instance are not comparable
    # Restarted less than a heartbeat TTL ago: workers are still re-registering, so the ring may
    # be incomplete (routers keep their last ring meanwhile).
    settling: bool = False
    full: bool = True
    version: int       # grows with every membership change and move of the handoff window
    load_version: int = 0
    epoch: int         # grows with membership changes only
    vnodes: int
    workers: list[RingWorker]
    removed: list[str] = []
    first_seq: int = 1  # the oldest ring change of the handoff window
    next_seq: int = 1   # the next ring change's number
    changes: list[RingChange] = []
    loads: list[LoadReport] = []


class RouteResponse(BaseModel):
    seq_id: str
    worker_id: str
    address: str
    epoch: int
    # Earlier owners of this key within the handoff window, still registered or draining,
    # newest first: where the owner can pull the sequence's KV from.
    previous: list[WorkerRef] = []


# --- stateless generation (the OpenAI-compatible API): gateway -> worker `POST /completions` ---

MAX_STOP_SEQUENCES = 4
MAX_N = 16  # choices per request


class ChatMessage(BaseModel):
    """One message, its content already flattened to text by the gateway."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = Field(..., max_length=1_000_000)


class WorkerCompletionRequest(SamplingFields):
    """A stateless request: no seq_id and no session store. Exactly one of `messages` (rendered
    with the worker's chat template, generation prompt added) or `prompt` (raw text). The worker
    reuses the longest cached token prefix (automatic prefix caching). Streams the same events as
    /generate (start, token, done, error); `stop` strings end generation with finish_reason "stop"
    and are not part of the text (unless include_stop_str_in_output). With `n` > 1, every event
    but the first `start` carries `choice` (0..n-1), and one `done` ends the stream, its
    `choices` holding each choice's result."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    prompt: str | None = Field(None, min_length=1)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: list[str] = Field([], max_length=MAX_STOP_SEQUENCES)
    stream: bool = True
    request_id: str | None = Field(None, min_length=1, max_length=128)
    n: int = Field(1, ge=1, le=MAX_N)
    prompt_logprobs: NumLogprobs | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "WorkerCompletionRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self


# --- vLLM's tokenizer endpoints: gateway `POST /tokenize|/detokenize` -> any worker ---

MAX_DETOKENIZE_TOKENS = 131_072


class _TokenizeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName | None = Field(None, description="If given, must name the served model.")
    return_token_strs: StrictBool = Field(False, description="Also return each token's string.")


class TokenizePromptRequest(_TokenizeBase):
    """vLLM's /tokenize body for raw text."""

    prompt: str = Field(..., min_length=1, max_length=4_000_000)
    add_special_tokens: StrictBool = Field(True, description="As the tokenizer adds them (vLLM's default).")


class TokenizeChatRequest(_TokenizeBase):
    """vLLM's /tokenize body for messages, rendered with the chat template /v1/chat/completions uses."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    add_generation_prompt: StrictBool = Field(True, description="End with the assistant's opening.")
    add_special_tokens: Literal[False] = Field(False, description="The chat template writes its own.")


TokenizeRequest = TokenizePromptRequest | TokenizeChatRequest


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName | None = Field(None, description="If given, must name the served model.")
    tokens: list[Annotated[int, Field(ge=0), NotBoolOrString]] = Field(..., max_length=MAX_DETOKENIZE_TOKENS)
