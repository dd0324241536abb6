"""The turn id of a `/generate` request: the client's `Idempotency-Key`, or one made by the gateway.

The session store records each turn's id with its sequence, so a request that repeats a stored
turn's id never appends again (the worker answers 409 `duplicate_turn` with the turn's outcome).
"""

import re
import uuid

from services.common.errors import InvalidRequest

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_RAW = IDEMPOTENCY_HEADER.lower().encode()
_KEY = re.compile(r"[\x21-\x7e]{1,128}")  # visible ASCII, as in the header's draft (RFC) examples


def turn_id(idempotency_key: str | None) -> str:
    if idempotency_key is None:
        return uuid.uuid4().hex
    if not _KEY.fullmatch(idempotency_key):
        raise InvalidRequest(f"{IDEMPOTENCY_HEADER} must be 1-128 visible ASCII characters",
                             param=IDEMPOTENCY_HEADER)
    return idempotency_key
