from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class CoordinatorSettings(ServiceSettings):
    """Environment variables: COORDINATOR_<FIELD>, e.g. COORDINATOR_VNODES=100."""

    model_config = SettingsConfigDict(env_prefix="COORDINATOR_")

    port: int = Field(8081, ge=1, le=65535)
    vnodes: int = Field(100, ge=1, le=10_000)
    ttl_s: float = Field(10.0, gt=0)
    sweep_interval_s: float = Field(1.0, gt=0)
