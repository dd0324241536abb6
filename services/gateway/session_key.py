"""The routing key of a stateless (OpenAI-style) request, so every turn of one conversation reaches
the worker that holds its KV with no change to the client.

The key is the client's `X-Session-Id` header when given; otherwise a hash of the model and the
conversation's opening, which every later turn resends unchanged: the system (and developer)
messages and the first user message of a chat, the first characters of a completion's prompt.
"""

import hashlib
import json

from services.common.schemas import check_seq_id

SESSION_HEADER = "X-Session-Id"
PROMPT_OPENING_CHARS = 256


def chat_opening(messages: list[tuple[str, str]]) -> list[str]:
    """(role, text) pairs -> the system/developer texts up to and including the first user text."""
    opening = []
    for role, text in messages:
        if role in ("system", "developer", "user"):
            opening.append(f"{role}:{text}")
        if role == "user":
            break
    return opening


def prompt_opening(prompt: str) -> list[str]:
    return [prompt[:PROMPT_OPENING_CHARS]]


def session_key(header: str | None, model: str, opening: list[str]) -> str:
    if header is not None:
        check_seq_id(header, SESSION_HEADER)
        return header
    digest = hashlib.sha256(json.dumps([model, *opening], ensure_ascii=False).encode()).hexdigest()
    return f"conv-{digest[:32]}"
