"""The one SSE encoder and the one SSE parser of the repo. Each event is one `data: <json>` line,
its "type" first (the engine builds every event that way), so a relay can read an event's type
without parsing it."""

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

TERMINAL_TYPES = frozenset({"done", "error"})
_TYPE_FIRST = '{"type":"'


def encode_event(event: dict) -> bytes:
    return encode_data(json.dumps(event, separators=(',', ':'), ensure_ascii=False))


def encode_data(data: str) -> bytes:
    """An event whose JSON text is already at hand (a relayed event)."""
    return f"data: {data}\n\n".encode()


def data_of(line: str) -> str | None:
    """The JSON text of a `data:` line; None for blank separators, ": ping" comments, other fields."""
    line = line.rstrip("\r\n")
    return line[5:].strip() if line.startswith("data:") else None


def event_type(data: str) -> str | None:
    """An event's type; read off the text when it comes first, else parsed (ValueError if invalid)."""
    if data.startswith(_TYPE_FIRST):
        end = data.find('"', len(_TYPE_FIRST))
        if end > 0:
            return data[len(_TYPE_FIRST):end]
    event = json.loads(data)
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) else None


def parse_events(lines: Iterable[str]) -> Iterator[dict]:
    for line in lines:
        data = data_of(line)
        if data is not None:
            yield json.loads(data)


async def aparse_events(lines: AsyncIterable[str]) -> AsyncIterator[dict]:
    async for line in lines:
        data = data_of(line)
        if data is not None:
            yield json.loads(data)
