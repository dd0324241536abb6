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


def check_seq_id(seq_id: str, name: str = "seq_id") -> None:
    """For a seq_id (or a key of the same alphabet) taken from a URL path or a header; bodies are
    checked by their schema."""
    if not _SEQ_ID_RE.fullmatch(seq_id):
        raise InvalidRequest(f"{name} must be 1-128 characters of [A-Za-z0-9._:-]",
                             param=None if name == "seq_id" else name)


class GenerateRequest(BaseModel):
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


class RegisterRequest(BaseModel):
    worker_id: str = Field(..., pattern=WORKER_ID_PATTERN)
    address: str = Field(..., min_length=1, max_length=512, pattern=r"^https?://")
    model_name: str | None = None
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


class ChatMessage(BaseModel):
    """One message, its content already flattened to text by the gateway."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = Field(..., max_length=1_000_000)


class WorkerCompletionRequest(BaseModel):
    """A stateless request: no seq_id and no session store. Exactly one of `messages` (rendered
    with the worker's chat template, generation prompt added) or `prompt` (raw text). The worker
    reuses the longest cached token prefix (automatic prefix caching). Streams the same events as
    /generate (start, token, done, error); `stop` strings end generation with finish_reason "stop"
    and are not part of the text."""

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

    @model_validator(mode="after")
    def _one_input(self) -> "WorkerCompletionRequest":
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of messages or prompt")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        return self
