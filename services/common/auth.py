"""Bearer-token check for the internal routes (worker /internal/*, coordinator membership calls)."""

import hmac

from fastapi import Request
from pydantic import SecretStr

from services.common.errors import ServiceError


class Unauthorized(ServiceError):
    status_code = 401
    error_type = "unauthorized"


def bearer_headers(token: SecretStr) -> dict[str, str]:
    """What a caller sends; empty when no token is configured."""
    value = token.get_secret_value()
    return {"Authorization": f"Bearer {value}"} if value else {}


def require_bearer(token: SecretStr):
    """A FastAPI dependency: 401 unless the request carries the token (no check when unset).
    Compared in constant time; the token never appears in an error message or a log."""
    expected = token.get_secret_value().encode()

    async def check(request: Request) -> None:
        if not expected:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise Unauthorized("missing or wrong bearer token")

    return check
