"""Settings shared by every service; each service subclasses with its own env prefix."""

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# How long every service keeps an idle client connection open (uvicorn's timeout_keep_alive, its
# default): a client's pool must expire idle connections sooner (GATEWAY_KEEPALIVE_EXPIRY_S).
SERVER_KEEP_ALIVE_S = 5


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    # The bearer token the services share for their internal calls (see each service's use).
    internal_token: SecretStr = SecretStr("")
    # A service refuses to start without internal_token unless this is set (tests, a throwaway
    # local run): its internal routes are then open to anyone who reaches its port.
    allow_no_internal_token: bool = False

    def check_internal_token(self) -> None:
        """SystemExit with the reason when the service must not start: no token, not allowed."""
        if self.internal_token.get_secret_value() or self.allow_no_internal_token:
            return
        prefix = self.model_config.get("env_prefix", "")
        raise SystemExit(f"{prefix}INTERNAL_TOKEN is not set: give every service the same secret (the local "
                         f"runner, Compose and Kubernetes do), or set {prefix}ALLOW_NO_INTERNAL_TOKEN=true to run "
                         "with internal routes open to anyone who can reach this port")
