"""The gateway's fast path for POST /generate: which requests it answers, and that it hands every
other one on to the app with the body it read replayed."""

import json
from types import SimpleNamespace

import httpx
from starlette.responses import JSONResponse

from services.common.schemas import GenerateRequest
from services.gateway.fast_generate import FastGenerate


class RecordingProxy:
    def __init__(self) -> None:
        self.payloads: list[dict] = []

    async def generate(self, payload: dict, *, stream: bool) -> JSONResponse:
        self.payloads.append(payload)
        return JSONResponse({"stream": stream, "seq_id": payload["seq_id"]})


class InnerApp:
    """Stands for the FastAPI app: records what reaches it and answers 418."""

    def __init__(self) -> None:
        self.received: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        self.received.append(await receive())
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def call(messages: list[dict], *, method: str = "POST", path: str = "/generate",
               content_type: bytes | None = b"application/json", extra_headers=()):
    inner, proxy = InnerApp(), RecordingProxy()
    headers = [(b"content-type", content_type)] if content_type is not None else []
    headers += list(extra_headers)
    scope = {"type": "http", "method": method, "path": path, "headers": headers,
             "app": SimpleNamespace(state=SimpleNamespace(proxy=proxy))}
    pending, sent = list(messages), []

    async def receive() -> dict:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await FastGenerate(inner)(scope, receive, send)
    return inner, proxy, sent


def body(data: bytes, more: bool = False) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


async def test_a_valid_body_is_answered_without_the_app():
    inner, proxy, sent = await call([body(b'{"prompt": "hi", "seq_id": "s-1", "stream": false}')])
    assert inner.received == []
    turn_id = proxy.payloads[0].pop("request_id")
    assert proxy.payloads == [{"prompt": "hi", "seq_id": "s-1", "stream": False}]
    assert len(turn_id) == 32  # made by the gateway: no Idempotency-Key
    assert sent[0]["status"] == 200 and (b"x-seq-id", b"s-1") in sent[0]["headers"]
    assert json.loads(sent[1]["body"]) == {"stream": False, "seq_id": "s-1"}


async def test_the_idempotency_key_is_the_turn_id_and_a_bad_one_is_a_400():
    _, proxy, _ = await call([body(b'{"prompt": "hi", "seq_id": "s-1"}')],
                             extra_headers=[(b"idempotency-key", b"turn-7")])
    assert proxy.payloads[0]["request_id"] == "turn-7"
    _, proxy, sent = await call([body(b'{"prompt": "hi", "seq_id": "s-1"}')],
                                extra_headers=[(b"idempotency-key", b"has space")])
    assert proxy.payloads == [] and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["type"] == "invalid_request"


async def test_a_body_in_several_messages_and_json_with_a_charset_take_the_fast_path():
    inner, proxy, _ = await call([body(b'{"prompt": ', more=True), body(b'"hi"}')],
                                 content_type=b"application/json; charset=utf-8")
    assert inner.received == [] and proxy.payloads[0]["prompt"] == "hi"


async def test_a_missing_content_type_is_json_as_for_fastapi():
    inner, proxy, _ = await call([body(b'{"prompt": "hi"}')], content_type=None)
    assert inner.received == [] and len(proxy.payloads) == 1


async def test_an_invalid_body_goes_to_the_app_with_the_same_bytes():
    for bad in (b'{"prompt": ""}', b'{"prompt": "hi", "seed": false}', b'{"prompt": "hi", "x": 1}', b"{not json"):
        inner, proxy, sent = await call([body(bad)])
        assert inner.received == [body(bad)] and proxy.payloads == [] and sent[0]["status"] == 418


async def test_other_requests_go_to_the_app_untouched():
    for kwargs in ({"method": "GET"}, {"path": "/generate/x"}, {"content_type": b"text/plain"},
                   {"content_type": b"application/merge-patch+json"}):
        inner, proxy, _ = await call([body(b'{"prompt": "hi"}')], **kwargs)
        assert inner.received == [body(b'{"prompt": "hi"}')] and proxy.payloads == []


async def test_a_client_gone_mid_body_reaches_the_app_as_a_disconnect():
    inner, proxy, _ = await call([body(b'{"prompt": ', more=True), {"type": "http.disconnect"}])
    assert inner.received == [{"type": "http.disconnect"}] and proxy.payloads == []


async def test_the_fast_path_accepts_no_body_that_the_fastapi_route_rejects():
    """The fast path validates JSON text, the route a decoded dict: for tricky values of every
    field, what the fast path takes the route takes too (else a bad body would get past it)."""
    from fastapi import FastAPI

    from services.gateway.api import router

    app = FastAPI()
    app.include_router(router)
    app.state.proxy = RecordingProxy()
    values = ["null", "true", "false", "0", "1", "-1", "5.0", "5.5", "1e5", '"5"', '""', '"hi"', "[]", "{}",
              "NaN", "Infinity", "1180591620717411303424", '"true"', '"\\ud800"']
    bodies = [f'{{"prompt": "hi", "{field}": {value}}}' for field in GenerateRequest.model_fields for value in values]
    bodies += ['{"prompt": "hi", "prompt": ""}', '{"prompt": "a"}\n', '[{"prompt": "hi"}]']
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
        for text in bodies:
            inner, _, _ = await call([body(text.encode())])
            if not inner.received:  # the fast path answered it
                response = await client.post("/generate", content=text, headers={"content-type": "application/json"})
                assert response.status_code == 200, text
