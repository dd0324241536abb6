"""This worker's load as routers see it: generation requests in progress, from arrival to the end
of the response (a stream counts until its last byte), including those still waiting for their
turn, a KV pull or a batch slot. Reported on every heartbeat."""

from starlette.types import ASGIApp, Receive, Scope, Send

GENERATION_PATHS = frozenset({"/generate", "/completions"})


class InFlight:
    def __init__(self) -> None:
        self.count = 0


class InFlightMiddleware:
    """Pure ASGI (streams are not buffered); counts POSTs to GENERATION_PATHS."""

    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        self.in_flight.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1
