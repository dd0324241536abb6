"""API keys on the public gateway (GATEWAY_API_KEYS): every route but /health and /metrics needs
`Authorization: Bearer <key>`, the header the openai SDK sends.

A pure ASGI middleware, so SSE streams pass unbuffered; it runs before routing, so /openapi.json,
/docs and unknown paths are guarded too. A key is compared with every configured key in constant
time (no early exit: the timing says neither whether nor which key matched) and never logged.
"""

import hmac
import json
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.auth import Unauthorized
from services.gateway.openai_format import is_openai_path
from services.gateway.tenants import set_tenant, tenant_of

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and Prometheus carry no key


def load_api_keys(value: str) -> list[bytes]:
    """"" -> no keys (auth off); "a,b" -> two keys; "@/path" -> the keys in that file (commas or
    newlines; blank lines and `#` comments ignored). A file that cannot be read, a file with no
    key, or a value with no key (","): an error, since whoever set it wants auth on, never a
    gateway silently left open."""
    if not value.startswith("@"):
        keys = _split(value)
        if value.strip() and not keys:
            raise ValueError("GATEWAY_API_KEYS is set but holds no key (unset it to turn keys off)")
        return keys
    path = Path(value[1:])
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"GATEWAY_API_KEYS: cannot read {path}: {exc.strerror or exc}") from None
    keys = _split(",".join(line for line in lines if not line.strip().startswith("#")))
    if not keys:
        raise ValueError(f"GATEWAY_API_KEYS: {path} holds no key")
    return keys


def _split(text: str) -> list[bytes]:
    return [key.strip().encode() for key in text.split(",") if key.strip()]


def key_matches(given: bytes, keys: list[bytes]) -> bytes | None:
    """The configured key that equals `given`, or None."""
    matched = None
    for key in keys:
        matched = key if hmac.compare_digest(given, key) else matched
    return matched


class ApiKeyMiddleware:
    """Checks the key and records its tenant in the request's state (see tenants)."""

    def __init__(self, app: ASGIApp, keys: list[bytes], tenants: dict[bytes, str] | None = None) -> None:
        self.app = app
        self.tenants = tenants or {}
        self.keys = keys + [key for key in self.tenants if key not in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        failure = self._failure(scope)
        if isinstance(failure, bytes):  # the key that matched
            set_tenant(scope, tenant_of(failure, self.tenants))
            await self.app(scope, receive, send)
            return
        body = json.dumps(_error_body(scope["path"], failure)).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _failure(self, scope: Scope) -> str | bytes:
        """The matched key (bytes), or why the request is refused (str)."""
        header = dict(scope["headers"]).get(b"authorization")
        if header is None:
            return "missing API key: send Authorization: Bearer <key>"
        scheme, _, given = header.partition(b" ")
        matched = key_matches(given.strip(), self.keys) if scheme.lower() == b"bearer" else None
        return "invalid API key" if matched is None else matched


def _error_body(path: str, message: str) -> dict:
    if is_openai_path(path):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
    return Unauthorized(message).to_body()
