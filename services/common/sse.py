"""The one SSE encoder and the one SSE parser of the repo. Each event is one `data: <json>` line."""

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

TERMINAL_TYPES = frozenset({"done", "error"})


def encode_event(event: dict) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'), ensure_ascii=False)}\n\n".encode()


def _parse_line(line: str) -> dict | None:
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None  # blank separators, ": ping" comments, other fields
    return json.loads(line[5:].strip())


def parse_events(lines: Iterable[str]) -> Iterator[dict]:
    for line in lines:
        event = _parse_line(line)
        if event is not None:
            yield event


async def aparse_events(lines: AsyncIterable[str]) -> AsyncIterator[dict]:
    async for line in lines:
        event = _parse_line(line)
        if event is not None:
            yield event
