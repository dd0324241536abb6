"""Exactly-once turns at the worker: a repeated turn id never appends again, an unanswered turn
runs again in its place, a client can look a turn's outcome up, and a turn whose closing write
met a stopped redis-server is settled once it is back."""

import asyncio

import pytest
import pytest_asyncio

from services.worker.session_store import TurnEntry
from tests.conftest import require_redis_server
from tests.redis_server import RedisServer
from tests.service.test_worker_api import running_app, wait_for, worker_settings
from tests.unit.test_engine import Gate

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def worker(tiny_model_cache_dir):
    async with running_app(worker_settings(tiny_model_cache_dir, turn_lease_s=1.0)) as (app, client):
        yield app, client


def turn(prompt: str, seq_id: str, request_id: str, **extra) -> dict:
    return {"prompt": prompt, "seq_id": seq_id, "request_id": request_id, "max_tokens": 4,
            "temperature": 0, "stream": False, **extra}


async def outcomes(client, seq_id: str) -> dict:
    response = await client.get(f"/sequences/{seq_id}")
    assert response.status_code == 200, response.text
    return response.json()


def tokens(app, text: str) -> int:
    return len(app.state.worker.engine.encode(text))


async def test_a_repeated_turn_gets_409_with_its_outcome_and_never_appends(worker):
    app, client = worker
    n = tokens(app, "hello there")
    first = await client.post("/generate", json=turn("hello there", "dup-1", "key-1"))
    assert first.status_code == 200
    again = await client.post("/generate", json=turn("hello there", "dup-1", "key-1"))
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["type"] == "duplicate_turn"
    assert error["turn"] == {"turn_id": "key-1", "state": "completed", "prompt_tokens": n,
                             "completion_tokens": 4, "finish_reason": "length", "text": first.json()["text"]}
    seen = await outcomes(client, "dup-1")
    assert seen["history_tokens"] == n + 4 and not seen["open_turn"]
    assert [t["turn_id"] for t in seen["turns"]] == ["key-1"]


async def test_concurrent_duplicates_run_once(worker):
    app, client = worker
    answers = await asyncio.gather(*(client.post("/generate", json=turn("at once", "dup-2", "key-2"))
                                     for _ in range(4)))
    assert sorted(a.status_code for a in answers) == [200, 409, 409, 409]
    assert all(a.json()["error"]["type"] == "duplicate_turn" for a in answers if a.status_code == 409)
    seen = await outcomes(client, "dup-2")
    assert seen["history_tokens"] == tokens(app, "at once") + 4 and len(seen["turns"]) == 1


async def test_an_unanswered_turn_runs_again_in_its_place(worker):
    app, client = worker
    store = app.state.worker.turns.store
    engine = app.state.worker.engine
    await client.post("/generate", json=turn("one", "dup-3", "a"))
    first = tokens(app, "one") + 4
    # A worker opened turn "b" and died: its prompt is stored, its answer never was.
    store.begin_turn("dup-3", "b", first, engine.encode(" two"))
    await asyncio.sleep(1.1)  # its lease runs out
    retry = await client.post("/generate", json=turn(" two", "dup-3", "b"))
    assert retry.status_code == 200
    seen = await outcomes(client, "dup-3")
    assert seen["history_tokens"] == first + tokens(app, " two") + 4  # the prompt once, then its answer
    assert [(t["turn_id"], t["state"]) for t in seen["turns"]] == [("a", "completed"), ("b", "completed")]


async def test_the_outcome_of_an_unknown_sequence_is_404(worker):
    _, client = worker
    response = await client.get("/sequences/never-seen")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"


async def test_a_closing_write_that_met_a_stopped_store_is_rolled_back_when_it_returns(tiny_model_cache_dir,
                                                                                     tmp_path):
    require_redis_server()
    redis_server = RedisServer(data_dir=tmp_path / "redis").start()
    settings = worker_settings(tiny_model_cache_dir, session_store_url=redis_server.url, turn_lease_s=30.0)
    try:
        async with running_app(settings) as (app, client):
            engine = app.state.worker.engine
            assert (await client.post("/generate", json=turn("first", "f-1", "k1"))).status_code == 200
            await wait_for(lambda: engine.stats()["running"] == 0, "an idle engine")
            with Gate(engine, hold_at=3) as gate:  # the second turn is certainly running
                pending = asyncio.create_task(client.post("/generate", json=turn(" second", "f-1", "k2")))
                await asyncio.to_thread(gate.wait_reached)
                redis_server.stop()
                gate.released.set()
                failed = await pending
            assert failed.status_code >= 500  # the client is told: its turn is not stored
            assert len(app.state.worker.turns.repairs) == 1
            redis_server.start()
            await wait_for(lambda: len(app.state.worker.turns.repairs) == 0, "the rollback")
            seen = await outcomes(client, "f-1")
            first = tokens(app, "first") + 4
            assert seen["history_tokens"] == first and not seen["open_turn"]  # as if k2 never ran
            retry = await client.post("/generate", json=turn(" second", "f-1", "k2"))
            assert retry.status_code == 200
            stored = app.state.worker.turns.store.load("f-1")
            assert stored.turns == (TurnEntry("k1", 0, first - 4, 4, "length"),
                                    TurnEntry("k2", first, tokens(app, " second"), 4, "length"))
    finally:
        redis_server.stop()
