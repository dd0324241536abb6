"""The HTTP client factory of the services that call others with httpx (the worker: handoff pulls,
registration; the coordinator: its Kubernetes watch): one shared AsyncClient per service,
explicit timeouts. The gateway's client is aiohttp's (services/gateway/upstream.py)."""

import ssl
from urllib.parse import quote

import httpx

from services.common.settings import SERVER_KEEP_ALIVE_S


def make_client(*, connect_timeout_s: float = 2.0, read_timeout_s: float = 30.0,
                max_connections: int = 200, headers: dict[str, str] | None = None,
                verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """`headers` go on every request. An idle connection is dropped before the peer would close it.
    `verify`: how TLS peers are checked (a context trusting a cluster's CA, for one)."""
    timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=10.0, pool=10.0)
    limits = httpx.Limits(max_connections=max_connections, keepalive_expiry=SERVER_KEEP_ALIVE_S - 1)
    return httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, verify=verify)


def path_segment(value: str) -> str:
    """Percent-encode one URL path segment; "." and ".." too, which URL normalisation would eat."""
    segment = quote(value, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment
