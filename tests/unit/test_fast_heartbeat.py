"""The coordinator's fast path for POST /heartbeat: which requests it answers (on a real
Membership), and that it hands every other one on to the app with the body it read replayed."""

import json
from types import SimpleNamespace

import pytest
from pydantic import SecretStr

from services.coordinator.fast_heartbeat import MAX_BODY_BYTES, FastHeartbeat
from services.coordinator.membership import Membership
from services.coordinator.metrics import CoordinatorMetrics

TOKEN = "t" * 32
AUTH = (b"authorization", f"Bearer {TOKEN}".encode())


class InnerApp:
    """Stands for the FastAPI app: records the body that reaches it and answers 418."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b"") if message["type"] == "http.request" else None)
        await send({"type": "http.response.start", "status": 418, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
def state():
    membership = Membership(ttl_s=10, vnodes=8)
    membership.register("w1", "http://w1:8000", "m")
    return SimpleNamespace(membership=membership, metrics=CoordinatorMetrics())


async def call(state, data: bytes, *, headers=None, path: str = "/heartbeat", parts: list[dict] | None = None):
    """`data` as one message, or `parts` (the messages) instead."""
    inner = InnerApp()
    if headers is None:
        headers = [(b"content-type", b"application/json"), AUTH, (b"content-length", str(len(data)).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers,
             "app": SimpleNamespace(state=state)}
    pending = parts if parts is not None else [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive() -> dict:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await FastHeartbeat(inner, SecretStr(TOKEN))(scope, receive, send)
    return inner, sent


def ok_count(state) -> float:
    return state.metrics.heartbeats.labels(outcome="ok")._value.get()


async def test_a_heartbeat_is_recorded_and_answered_without_the_app(state):
    before = state.membership.get("w1").load_reports
    inner, sent = await call(state, b'{"worker_id": "w1", "load": 3}')
    assert inner.bodies == []
    assert sent[0]["status"] == 200 and dict(sent[0]["headers"])[b"content-type"] == b"application/json"
    assert json.loads(sent[1]["body"]) == {"worker_id": "w1", "epoch": state.membership.epoch}
    assert int(dict(sent[0]["headers"])[b"content-length"]) == len(sent[1]["body"])
    info = state.membership.get("w1")
    assert info.load == 3 and info.load_reports == before + 1 and ok_count(state) == 1


@pytest.mark.parametrize("data, headers", [
    (b'{"worker_id": "ghost"}', None),                      # unknown: the route's 404, counted there
    (b'{"worker_id": 7}', None),                            # invalid: the route's 422
    (b'{"worker_id": "w1", "load": -1}', None),
    (b'{"worker_id": "w1"', None),                          # not JSON
    (b'{"worker_id": "w1"}', [(b"content-type", b"application/json"), (b"content-length", b"19")]),  # no token
    (b'{"worker_id": "w1"}', [(b"content-type", b"application/json"), (b"authorization", b"Bearer nope"),
                              (b"content-length", b"19")]),
    (b'{"worker_id": "w1"}', [(b"content-type", b"application/json"), AUTH]),  # chunked: no declared length
    (b'{"worker_id": "w1"}', [(b"content-type", b"text/plain"), AUTH, (b"content-length", b"19")]),
    (b'{"worker_id": "w1"}' + b" " * MAX_BODY_BYTES, None),  # large
])
async def test_anything_else_reaches_the_app_with_its_body(state, data, headers):
    inner, sent = await call(state, data, headers=headers)
    assert inner.bodies == [data] and sent[0]["status"] == 418
    assert state.membership.get("w1").load_reports == 0 and ok_count(state) == 0


async def test_a_body_in_parts_is_read_whole_and_a_client_gone_mid_body_reaches_the_app(state):
    headers = [(b"content-type", b"application/json"), AUTH, (b"content-length", b"30")]
    first = {"type": "http.request", "body": b'{"worker_id": ', "more_body": True}
    rest = {"type": "http.request", "body": b'"w1", "load": 2}', "more_body": False}
    inner, sent = await call(state, b"", headers=headers, parts=[first, rest])
    assert inner.bodies == [] and sent[0]["status"] == 200 and state.membership.get("w1").load == 2
    inner, sent = await call(state, b"", headers=headers, parts=[dict(first)])  # then the client leaves
    assert inner.bodies == [None] and sent[0]["status"] == 418  # the app sees the disconnect


async def test_other_routes_are_not_touched(state):
    inner, _ = await call(state, b'{"worker_id": "w1"}', path="/register")
    assert inner.bodies == [b'{"worker_id": "w1"}']
