from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings
from services.common.hash_ring import DEFAULT_VNODES


class CoordinatorSettings(ServiceSettings):
    """Environment variables: COORDINATOR_<FIELD>, e.g. COORDINATOR_VNODES=100."""

    model_config = SettingsConfigDict(env_prefix="COORDINATOR_")

    port: int = Field(8081, ge=1, le=65535)
    # Ring points per worker; fewer are cheaper and less even (README, "Control plane at scale").
    vnodes: int = Field(DEFAULT_VNODES, ge=1, le=65_536)
    ttl_s: float = Field(10.0, gt=0)
    sweep_interval_s: float = Field(1.0, gt=0)
    # How long earlier owners of a key stay listed in `previous` (KV handoff sources).
    handoff_window_s: float = Field(600.0, ge=0)
    # internal_token (COORDINATOR_INTERNAL_TOKEN, required to start): /register, /heartbeat,
    # /deregister and /drain require `Authorization: Bearer <token>`.
