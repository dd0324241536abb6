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


def bearer_matches(authorization: bytes, expected: bytes) -> bool:
    """Whether an Authorization header's value carries the token (any when none is set). Compared
    in constant time."""
    if not expected:
        return True
    scheme, _, given = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), expected)


def require_bearer(token: SecretStr):
    """A FastAPI dependency: 401 unless the request carries the token (no check when unset).
    The token never appears in an error message or a log."""
    expected = token.get_secret_value().encode()

    async def check(request: Request) -> None:
        if not bearer_matches(request.headers.get("authorization", "").encode("latin-1"), expected):
            raise Unauthorized("missing or wrong bearer token")

    return check
