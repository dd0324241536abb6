"""Stop strings over incrementally detokenized text (no torch here).

Text that could be the beginning of a stop string is held back until the next pieces show
whether it is one, so a stop string never reaches the client, not even in part. When a stop
string appears, the text before it is released and generation ends; the stop string (unless
`include`: vLLM's include_stop_str_in_output) and anything after it are dropped.
"""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StopMatcher:
    stops: Sequence[str]
    include: bool = False  # release the stop string itself too
    held: str = ""  # a suffix of the text so far that is a proper prefix of some stop string

    def push(self, piece: str, final: bool = False) -> tuple[str, bool]:
        """Text to release now, and whether a stop string was hit. `final`: the generation ends
        here for another reason, so nothing is held back any more."""
        text = self.held + piece
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.held = ""
            if self.include:
                cut += max(len(s) for s in self.stops if text.startswith(s, cut))
            return text[:cut], True
        keep = 0 if final else held_suffix_len(text, self.stops)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_suffix_len(text: str, stops: Sequence[str]) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
