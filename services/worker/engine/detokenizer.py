"""Incremental detokenization: emit text only once its bytes form whole characters, so the
token events' texts concatenate to the final text (byte-level tokens split UTF-8 characters)."""

from dataclasses import dataclass


@dataclass
class DetokState:
    prefix_offset: int = 0
    read_offset: int = 0


def next_text(tokenizer, ids: list[int], state: DetokState, final: bool = False) -> str:
    """The new text that `ids[-1]` completes. `final`: the generation ends here, so flush what
    is held back (an incomplete character decodes as U+FFFD, as in the final text)."""
    prefix = tokenizer.decode(ids[state.prefix_offset:state.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(ids[state.prefix_offset:], skip_special_tokens=True)
    if not final and (len(full) <= len(prefix) or full.endswith("\ufffd")):
        return ""  # an incomplete character: wait for its next bytes
    state.prefix_offset, state.read_offset = state.read_offset, len(ids)
    return full[len(prefix):]
