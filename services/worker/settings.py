from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings

MAX_SERVED_NAMES = 16  # RegisterRequest.served_model_names takes at most 16


class WorkerSettings(ServiceSettings):
    """Environment variables: WORKER_<FIELD>, e.g. WORKER_MODEL_NAME=gpt2."""

    model_config = SettingsConfigDict(env_prefix="WORKER_")

    port: int = Field(8082, ge=1, le=65535)
    # Stable identity on the ring; defaults to "worker-<port>". In Kubernetes: the pod name.
    worker_id: str = Field("", pattern=r"^[A-Za-z0-9._:-]{0,128}$",
                           validation_alias=AliasChoices("WORKER_ID", "worker_id"))
    # URL the gateway uses to reach this worker; defaults to http://127.0.0.1:<port>.
    advertise_address: str = ""
    coordinator_url: str = "http://127.0.0.1:8081"
    heartbeat_interval_s: float = Field(2.0, gt=0)
    # Set to false to run a worker without a coordinator (benchmarks, single-node use).
    register_with_coordinator: bool = True

    # A Hugging Face id or local path ("gpt2"), or a built-in preset: tiny-gpt2, gpt2-small-random.
    model_name: str = "tiny-gpt2"
    # The names clients use for the model, comma-separated (vLLM's --served-model-name), e.g.
    # "gpt2,gpt2-small-random": /generate's model_name and /v1's model accept any of them, and
    # /v1/models lists them. Empty: model_name only.
    served_model_name: str = Field("", max_length=4096)
    # Where presets are built and saved before being loaded with from_pretrained.
    model_cache_dir: Path = Path.home() / ".cache" / "kvcache" / "models"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # auto: float32 on CPU (bf16/fp16 are slower there), float16 on CUDA.
    dtype: str = Field("auto", pattern=r"^(auto|float32|float16|bfloat16)$")

    # KV budget in bytes; 0 = automatic (a fraction of free GPU memory, or of RAM on CPU).
    kv_cache_bytes: int = Field(0, ge=0)
    kv_cache_memory_fraction: float = Field(0.25, gt=0, le=0.95)
    # The KV tiers below device memory (README "KV tiers"); false: none (the benchmark's baseline:
    # what device memory evicts is recomputed). Host memory: -1 = automatic (on CUDA a quarter of
    # RAM, pinned; on CPU device memory already is RAM, so one model window, what an eviction
    # passes down on its way to disk: give more RAM to kv_cache_bytes instead). 0 = none.
    kv_tiers: bool = True
    kv_host_bytes: int = Field(-1, ge=-1)
    # A local directory (an emptyDir or local SSD in Kubernetes); empty = <cache>/kv-disk/<worker_id>.
    kv_disk_dir: str = ""
    kv_disk_bytes: int = Field(4 * 2**30, ge=0)  # 0 = no disk tier
    # The tier every worker reads: a directory or fsspec URL (file://, gs://bucket/prefix) or
    # redis://host:port/db. The default, a directory, is shared by the workers of one host (like
    # the SQLite session store). Empty = no shared tier.
    kv_shared_url: str = str(Path.home() / ".cache" / "kvcache" / "kv-shared")
    kv_shared_bytes: int = Field(16 * 2**30, ge=0)  # fsspec sweep; Redis uses its own maxmemory
    kv_shared_ttl_s: float = Field(24 * 3600.0, gt=0)
    # Tier writes waiting for the writer thread; a write arriving when it is full is dropped
    # (counted), never waited for.
    kv_tier_write_queue: int = Field(64, ge=1)
    # false: every request recomputes its whole context (baseline for benchmarks).
    enable_kv_reuse: bool = True
    # A finished turn's last token waits this long for the sequence's next request, which then
    # computes it in its own first step (0: a step of its own writes it at once). See README.
    tail_wait_s: float = Field(0.05, ge=0, le=1.0)

    max_batch_size: int = Field(32, ge=1, le=1024)
    # Tokens in one forward pass: decode tokens plus chunks of prompts being prefilled.
    max_batch_tokens: int = Field(512, ge=16)
    max_waiting_requests: int = Field(256, ge=1)
    torch_threads: int = Field(0, ge=0)  # 0 = torch's default

    # The source of truth for every sequence's token ids: sqlite:///PATH (one host; the file is
    # shared by every worker that names it) or redis://[:password@]host:port/db.
    session_store_url: str = Field(f"sqlite:///{Path.home() / '.cache' / 'kvcache' / 'sessions.db'}",
                                   pattern=r"^(sqlite:///.+|rediss?://.*)$")
    session_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)  # an idle session expires after this
    # A turn in progress holds its sequence for this long, renewed while it runs; a crashed
    # worker's turn is released after it.
    turn_lease_s: float = Field(30.0, gt=0)
    # On SIGTERM: finish running requests, serve KV pulls, then exit, within this time.
    drain_timeout_s: float = Field(30.0, ge=0)
    # The KV tensor API (/kv/*, README "KV tensor API"): an in-memory store per worker, apart from
    # the engine's KV. Its byte budget over every seq_id (least recently used seq_ids are evicted
    # whole; 0 stores nothing), the most one (seq_id, layer) K or V tensor may hold, and whether
    # torch.save's encoding (the reference design's; loaded with weights_only=True) is taken
    # besides "raw".
    kv_tensor_bytes: int = Field(256 * 2**20, ge=0)
    kv_tensor_max_bytes: int = Field(16 * 2**20, ge=1)
    kv_tensor_allow_torch_save: bool = True
    # internal_token (WORKER_INTERNAL_TOKEN, required to start): /internal/*, DELETE /sequences/*
    # and a /generate naming handoff_sources or resume require `Authorization: Bearer <token>`;
    # the worker sends it to the coordinator and to the workers it pulls KV from.
    # A request body over this many bytes is refused with 413 before it is read whole.
    max_body_bytes: int = Field(4 * 2**20, ge=1024)
    # A request body not received whole this long after its head gets 408 (a slow or stalled client).
    body_timeout_s: float = Field(30.0, gt=0)

    @property
    def served_model_names(self) -> list[str]:
        names = [name.strip() for name in self.served_model_name.split(",") if name.strip()]
        return list(dict.fromkeys(names)) or [self.model_name]

    @model_validator(mode="after")
    def _check_served_names(self) -> "WorkerSettings":
        names = [name.strip() for name in self.served_model_name.split(",") if name.strip()]
        if len(names) > MAX_SERVED_NAMES or any(len(name) > 256 for name in names):
            raise ValueError(f"served_model_name: at most {MAX_SERVED_NAMES} names of up to 256 characters")
        return self

    @model_validator(mode="after")
    def _fill_identity(self) -> "WorkerSettings":
        if not self.worker_id:
            self.worker_id = f"worker-{self.port}"
        if not self.advertise_address:
            self.advertise_address = f"http://127.0.0.1:{self.port}"
        self.advertise_address = self.advertise_address.rstrip("/")
        if not self.kv_disk_dir:
            self.kv_disk_dir = str(Path.home() / ".cache" / "kvcache" / "kv-disk" / self.worker_id)
        return self
