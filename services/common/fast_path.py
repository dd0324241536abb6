"""What the raw-ASGI fast paths (the gateway's POST /generate, the coordinator's POST /heartbeat)
share: which requests they may take. Anything they do not take goes on to the FastAPI route, which
stays the one that documents the route and answers its errors."""

from starlette.types import Scope


def json_post_headers(scope: Scope, path: str) -> dict[bytes, bytes] | None:
    """The request's headers if it is a POST to `path` with a JSON body, else None."""
    if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != path:
        return None
    headers = dict(scope["headers"])
    # What FastAPI decodes as JSON (it also takes +json types; those go to it)
    content_type = headers.get(b"content-type", b"").lower()
    is_json = content_type in (b"", b"application/json") or content_type.startswith(b"application/json;")
    return headers if is_json else None
