"""Incremental detokenization: emit text only once its bytes form whole characters, so the
token events' texts concatenate to the final text (byte-level tokens split UTF-8 characters)."""

import functools
from dataclasses import dataclass


@dataclass
class DetokState:
    prefix_offset: int = 0
    read_offset: int = 0


@dataclass(frozen=True)
class DecodeOptions:
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


DEFAULT_DECODE = DecodeOptions()


def decode(tokenizer, ids: list[int], options: DecodeOptions = DEFAULT_DECODE) -> str:
    """`tokenizer.decode`, plus vLLM's `spaces_between_special_tokens` (its slow-tokenizer rule:
    each added token kept in the text is its own piece, pieces joined with a space), which fast
    tokenizers ignore."""
    added, special = _added_tokens(tokenizer) if options.spaces_between_special_tokens else ({}, ())
    if not any(i in added for i in ids):
        return tokenizer.decode(ids, skip_special_tokens=options.skip_special_tokens)
    pieces, run = [], []
    for i in ids:
        if options.skip_special_tokens and i in special:
            continue  # skipped: it does not split the text around it
        if i not in added:
            run.append(i)
            continue
        if run:
            pieces.append(tokenizer.decode(run))
            run = []
        pieces.append(added[i])
    if run:
        pieces.append(tokenizer.decode(run))
    return " ".join(p for p in pieces if p)


@functools.lru_cache(maxsize=8)
def _added_tokens(tokenizer) -> tuple[dict[int, str], frozenset[int]]:
    """(added token id -> its text, the special ids): built once (transformers rebuilds the dict
    on every access)."""
    added = {i: token.content for i, token in tokenizer.added_tokens_decoder.items()}
    return added, frozenset(tokenizer.all_special_ids)


def next_text(tokenizer, ids: list[int], state: DetokState, final: bool = False,
              options: DecodeOptions = DEFAULT_DECODE) -> str:
    """The new text that `ids[-1]` completes. `final`: the generation ends here, so flush what
    is held back (an incomplete character decodes as U+FFFD, as in the final text)."""
    prefix = decode(tokenizer, ids[state.prefix_offset:state.read_offset], options)
    full = decode(tokenizer, ids[state.prefix_offset:], options)
    if not final and (len(full) <= len(prefix) or full.endswith("\ufffd")):
        return ""  # an incomplete character: wait for its next bytes
    state.prefix_offset, state.read_offset = state.read_offset, len(ids)
    return full[len(prefix):]
