from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import SERVER_KEEP_ALIVE_S, StallWatchedSettings


class GatewaySettings(StallWatchedSettings):
    """Environment variables: GATEWAY_<FIELD>, e.g. GATEWAY_COORDINATOR_URL."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")

    port: int = Field(8080, ge=1, le=65535)
    # Off here: uvicorn's line cost 150-280 us of the gateway's ~1.4 ms CPU per relayed request
    # (README, "Routing tax"); requests are counted in /metrics and errors are still logged.
    access_log: bool = False
    coordinator_url: str = "http://127.0.0.1:8081"
    connect_timeout_s: float = Field(2.0, gt=0)
    # Between two bytes of a worker's stream; a long prefill is the slowest gap.
    read_timeout_s: float = Field(300.0, gt=0)
    # Connections to one worker (or the coordinator) at most; a stream holds one for its whole
    # life. Above what a worker takes at once by default (32 running + 256 waiting; it answers
    # 429 past that), so that the worker, not this limit, says when it is full.
    max_worker_connections: int = Field(512, ge=1)
    # A request past that limit waits this long for a connection, then gets 503 with Retry-After.
    connection_wait_s: float = Field(1.0, ge=0)
    # An idle pooled connection to a worker is closed after this long: before the worker closes
    # it (SERVER_KEEP_ALIVE_S), so that no request goes out on a connection being closed.
    keepalive_expiry_s: float = Field(4.0, gt=0, lt=SERVER_KEEP_ALIVE_S)
    # TCP keep-alive on connections to workers: a probe after this many seconds of silence, then
    # every as many; 3 unanswered fail the connection (a vanished host: noticed in ~4x this).
    tcp_keepalive_s: int = Field(5, ge=1, le=3600)
    # A stream that breaks before its terminal event continues on the sequence's new owner at
    # most this many times per request (0: never; the stream ends with an error event).
    migration_limit: int = Field(1, ge=0, le=10)
    # How /v1 requests pick a worker: `affinity` (the owner of the conversation's routing key,
    # which holds its KV) or `round_robin` (each request to the next worker; for comparison only).
    routing: Literal["affinity", "round_robin"] = "affinity"
    # Bounded-load consistent hashing (affinity routing): a request passes its key's owner when
    # that worker's load is above this factor times the average (plus one). 0: off; else >= 1.
    load_factor: float = Field(0.0, ge=0)
    # Comma-separated keys, or @/path/to/file; empty: no key needed. When set, every route but
    # /health and /metrics needs `Authorization: Bearer <key>`.
    api_keys: SecretStr = SecretStr("")
    # A JSON file {tenant: [keys]} grouping keys into tenants (their keys need no GATEWAY_API_KEYS
    # entry). A key not in it is a tenant of its own. Tenants never see each other's seq_ids.
    tenants_file: str = ""
    # internal_token (GATEWAY_INTERNAL_TOKEN, required to start): sent as `Authorization: Bearer
    # <token>` on every call to a worker (the workers' WORKER_INTERNAL_TOKEN): a worker takes
    # handoff sources and deletes only from its holder.

    # A request body over this many bytes is refused with 413 before it is read whole.
    max_body_bytes: int = Field(4 * 2**20, ge=1024)
    # A request body not received whole this long after its head gets 408 (a slow or stalled client).
    body_timeout_s: float = Field(30.0, gt=0)

    @field_validator("load_factor")
    @classmethod
    def _off_or_at_least_one(cls, value: float) -> float:
        if 0 < value < 1:
            raise ValueError("must be 0 (off) or at least 1 (no worker can stay below the average)")
        return value
