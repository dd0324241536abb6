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


def has_bearer(request: Request, token: SecretStr) -> bool:
    """Whether the request carries the token (any request does when none is configured).
    Compared in constant time; the token never appears in an error message or a log."""
    expected = token.get_secret_value().encode()
    if not expected:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)


def check_bearer(request: Request, token: SecretStr, message: str = "missing or wrong bearer token") -> None:
    """401 (Unauthorized, with `message`) unless the request carries the token."""
    if not has_bearer(request, token):
        raise Unauthorized(message)


def require_bearer(token: SecretStr):
    """A FastAPI dependency: 401 unless the request carries the token (no check when unset)."""

    async def check(request: Request) -> None:
        check_bearer(request, token)

    return check
