"""POST /generate without FastAPI's per-request work (route matching, dependency solving, the body
decoded to a dict and then validated): the gateway's hot path, 0.1-0.2 ms off the p50 of
scenario 10's routing tax (README).

Only a JSON body that validates takes it. Anything else (another route, another content type, a
body that does not validate, a client gone mid-body) goes on to the FastAPI app with its body
replayed, so the FastAPI route stays the one that documents /generate and answers its errors. Both
paths build the response with api.generate_response.
"""

from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.body_limit import read_body, replaying
from services.common.fast_path import json_post_headers
from services.common.schemas import GenerateRequest
from services.gateway.api import generate_response
from services.gateway.idempotency import IDEMPOTENCY_KEY_RAW
from services.gateway.tenants import tenant_in


class FastGenerate:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = json_post_headers(scope, "/generate")
        if headers is None:
            await self.app(scope, receive, send)
            return
        body, complete = await read_body(receive)
        replay = replaying(body, complete, receive)
        if not complete:
            await self.app(scope, replay, send)
            return
        try:
            request = GenerateRequest.model_validate_json(body)
        except ValidationError:
            await self.app(scope, replay, send)
            return
        key = headers.get(IDEMPOTENCY_KEY_RAW)
        response = await generate_response(scope["app"].state.proxy, request,
                                           key.decode("latin-1") if key is not None else None, tenant_in(scope))
        await response(scope, receive, send)

