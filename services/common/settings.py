"""Settings shared by every service; each service subclasses with its own env prefix."""

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# How long every service keeps an idle client connection open (uvicorn's timeout_keep_alive, its
# default): a client's pool must expire idle connections sooner (GATEWAY_KEEPALIVE_EXPIRY_S).
SERVER_KEEP_ALIVE_S = 5


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    # One uvicorn access-log line per request (at info). It is a measured share of the gateway's
    # CPU per relayed request (about 150 us of 1.4 ms, README "Routing tax"): off, it logs no requests.
    access_log: bool = True
    # The bearer token the services share for their internal calls (see each service's use).
    internal_token: SecretStr = SecretStr("")
    # Or a file holding it (Compose's init service writes a random one; a mounted Secret), read
    # at start-up when internal_token is unset.
    internal_token_file: str = ""
    # A service refuses to start without internal_token unless this is set (tests, a throwaway
    # local run): its internal routes are then open to anyone who reaches its port.
    allow_no_internal_token: bool = False
    # Slow clients (services/common/slow_clients.py): a connection whose request head is not
    # complete this long after it opened (or after a later request's first byte) is closed...
    header_timeout_s: float = Field(10.0, gt=0)
    # ...and one whose client takes none of a response (a stream included) for this long is aborted.
    send_timeout_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _read_internal_token_file(self) -> "ServiceSettings":
        if self.internal_token_file and not self.internal_token.get_secret_value():
            try:
                token = Path(self.internal_token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(f"internal_token_file: cannot read {self.internal_token_file}: "
                                 f"{exc.strerror or exc}") from None
            if not token:
                raise ValueError(f"internal_token_file: {self.internal_token_file} is empty")
            self.internal_token = SecretStr(token)
        return self

    def check_internal_token(self) -> None:
        """SystemExit with the reason when the service must not start: no token, not allowed."""
        if self.internal_token.get_secret_value() or self.allow_no_internal_token:
            return
        prefix = self.model_config.get("env_prefix", "")
        raise SystemExit(f"{prefix}INTERNAL_TOKEN is not set: give every service the same secret (the local "
                         f"runner, Compose and Kubernetes do), or set {prefix}ALLOW_NO_INTERNAL_TOKEN=true to run "
                         "with internal routes open to anyone who can reach this port")


class StallWatchedSettings(ServiceSettings):
    """A service that measures its event-loop stalls (services/common/loop_stall.py): the
    coordinator and the gateway."""

    # Log where the event loop's thread is (its stack) whenever the loop is held this long: what
    # causes the stalls the event_loop_stall gauges report. 0: off (else a thread looks every 5 ms).
    loop_stall_log_ms: float = Field(0.0, ge=0)
