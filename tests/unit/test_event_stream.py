"""EventStream, the SSE response of every service, driven as uvicorn drives an ASGI app."""

import asyncio

import pytest

from services.common.event_stream import PING, EventStream, FinalChunk


class Client:
    """The server side of one connection: what the app sent, and a disconnect to trigger."""

    def __init__(self) -> None:
        self.sent: list[dict] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        self.sent.append(message)

    def bodies(self) -> list[tuple[bytes, bool]]:
        return [(m["body"], m["more_body"]) for m in self.sent if m["type"] == "http.response.body"]


class Closer:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


async def run(response: EventStream, client: Client) -> None:
    await response({"type": "http", "method": "GET"}, client.receive, client.send)


async def test_chunks_in_order_and_the_final_one_ends_the_response():
    async def body():
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"
        yield FinalChunk(b"data: 3\n\n")
        raise AssertionError("nothing is read past the final chunk")

    client, close = Client(), Closer()
    await run(EventStream(body(), headers={"X-Seq-Id": "s"}, close=close), client)
    start = client.sent[0]
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream")
    assert headers[b"x-seq-id"] == b"s" and headers[b"cache-control"] == b"no-cache"
    assert client.bodies() == [(b"data: 1\n\n", True), (b"data: 2\n\n", True), (b"data: 3\n\n", False)]
    assert close.calls == 1


async def test_a_body_without_a_final_chunk_ends_with_an_empty_message():
    async def body():
        yield b"data: 1\n\n"

    client = Client()
    await run(EventStream(body()), client)
    assert client.bodies() == [(b"data: 1\n\n", True), (b"", False)]


async def test_a_client_disconnect_cancels_the_body_and_closes():
    cleaned = asyncio.Event()

    async def body():
        try:
            yield b"data: 1\n\n"
            await asyncio.sleep(30)  # a long prefill: the disconnect must not wait for it
            yield b"data: 2\n\n"
        finally:
            cleaned.set()

    client, close = Client(), Closer()
    task = asyncio.create_task(run(EventStream(body(), close=close), client))
    while not client.bodies():
        await asyncio.sleep(0.01)
    client.gone.set()
    await asyncio.wait_for(task, 5)  # returns normally: the client's leaving ends the response
    assert cleaned.is_set() and close.calls == 1
    assert client.bodies() == [(b"data: 1\n\n", True)]
    assert not task.cancelled()


async def test_pings_while_the_body_is_silent():
    async def body():
        yield b"data: 1\n\n"
        await asyncio.sleep(0.35)
        yield FinalChunk(b"data: 2\n\n")

    client = Client()
    await run(EventStream(body(), ping_s=0.1), client)
    bodies = client.bodies()
    assert bodies[0] == (b"data: 1\n\n", True) and bodies[-1] == (b"data: 2\n\n", False)
    assert 2 <= bodies.count((PING, True)) <= 4
    assert all(body == PING for body, _ in bodies[1:-1])


async def test_a_ping_comes_ping_s_after_the_last_send_not_after_the_last_check():
    """A chunk sent just after the watcher's check used to put the next ping nearly 2 x ping_s
    after it."""
    loop = asyncio.get_running_loop()
    timeline: list[tuple[bytes, float]] = []

    async def body():
        yield b"data: 1\n\n"
        await asyncio.sleep(0.6)  # past the first deadline (0.5): the watcher has checked and pinged
        yield b"data: 2\n\n"  # 0.1 after that check
        await asyncio.sleep(0.8)
        yield FinalChunk(b"data: 3\n\n")

    class Timed(Client):
        async def send(self, message: dict) -> None:
            await super().send(message)
            if message["type"] == "http.response.body":
                timeline.append((message["body"], loop.time()))

    await run(EventStream(body(), ping_s=0.5), Timed())
    second = next(i for i, (chunk, _) in enumerate(timeline) if chunk == b"data: 2\n\n")
    ping, ping_at = timeline[second + 1]
    assert ping == PING
    gap = ping_at - timeline[second][1]
    assert 0.45 <= gap < 0.8, gap  # one ping_s after the chunk (0.9 before the fix)


async def test_a_failing_body_still_closes():
    async def body():
        yield b"data: 1\n\n"
        raise RuntimeError("broken")

    client, close = Client(), Closer()
    with pytest.raises(RuntimeError, match="broken"):
        await run(EventStream(body(), close=close), client)
    assert close.calls == 1


async def test_the_head_waits_for_the_first_chunk_and_goes_just_before_it():
    produced = asyncio.Event()
    release = asyncio.Event()

    async def body():
        await release.wait()
        produced.set()
        yield FinalChunk(b"data: 1\n\n")

    client = Client()
    task = asyncio.create_task(run(EventStream(body()), client))
    await asyncio.sleep(0.05)
    assert client.sent == []  # nothing on the wire while the body has no chunk
    release.set()
    await asyncio.wait_for(task, 5)
    assert [m["type"] for m in client.sent] == ["http.response.start", "http.response.body"]
    assert client.bodies() == [(b"data: 1\n\n", False)]


async def test_a_ping_before_the_first_chunk_brings_the_head():
    async def body():
        await asyncio.sleep(0.25)
        yield FinalChunk(b"data: 1\n\n")

    client = Client()
    await run(EventStream(body(), ping_s=0.1), client)
    assert client.sent[0]["type"] == "http.response.start" and client.sent[0]["status"] == 200
    bodies = client.bodies()
    assert bodies[0] == (PING, True) and bodies[-1] == (b"data: 1\n\n", False)
    assert [m["type"] for m in client.sent].count("http.response.start") == 1
