"""X-Request-Id on every gateway response, as vLLM's server sends it: the client's own id echoed
(1-128 visible ASCII characters; any other value is a 400), or one made here. Outermost, so that
the gateway's own refusals (401, 408, 413) carry it too."""

import re
import uuid
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import InvalidRequest, ServiceError

REQUEST_ID_HEADER = "X-Request-Id"
_RAW = REQUEST_ID_HEADER.lower().encode()
_VALID = re.compile(rb"[\x21-\x7e]{1,128}")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp, render: Callable[[Request, ServiceError], Response]) -> None:
        self.app = app
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == _RAW), None)
        request_id = given if given is not None else uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != _RAW]
                message = {**message, "headers": headers + [(_RAW, request_id)]}
            await send(message)

        if given is not None and not _VALID.fullmatch(given):
            request_id = uuid.uuid4().hex.encode()  # never echo what was refused
            error = InvalidRequest(f"{REQUEST_ID_HEADER} must be 1-128 visible ASCII characters",
                                   param=REQUEST_ID_HEADER)
            await self.render(Request(scope, receive), error)(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)
