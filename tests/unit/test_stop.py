"""Stop strings over streamed text: held back while they may begin, never released in part,
the text before them released, nothing after them."""

import pytest

from services.worker.engine.stop import StopMatcher, first_stop, held_suffix_len


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool, int]:
    """Released pieces, whether a stop hit, and after how many pieces."""
    matcher, out = StopMatcher(stops), []
    for i, piece in enumerate(pieces):
        text, hit = matcher.push(piece, final=i == len(pieces) - 1)
        out.append(text)
        if hit:
            return out, True, i + 1
    return out, False, len(pieces)


def test_a_stop_split_across_pieces_is_never_released():
    out, hit, n = feed(["<|end|>"], ["Hello", " wor", "ld<", "|e", "nd", "|>", "after"])
    assert hit and n == 6
    assert "".join(out) == "Hello world"
    assert out == ["Hello", " wor", "ld", "", "", ""]
    assert not any("<" in piece for piece in out)


def test_held_text_that_turns_out_not_to_be_a_stop_is_released():
    out, hit, _ = feed(["<|end|>"], ["a <", "|en", "gine", " ok"])
    assert not hit
    assert out == ["a ", "", "<|engine", " ok"]


def test_held_text_is_flushed_at_the_end():
    out, hit, _ = feed(["STOP"], ["go ST", "O"])  # the generation ends on a partial stop
    assert not hit and "".join(out) == "go STO"


def test_stop_inside_one_piece_drops_the_rest():
    out, hit, n = feed(["\n\n"], ["one\n\ntwo", "three"])
    assert hit and n == 1 and out == ["one"]


def test_earliest_of_several_stops_wins():
    out, hit, _ = feed(["cd", "b"], ["abcd"])
    assert hit and out == ["a"]
    out, hit, _ = feed(["xyz", "yq"], ["wxy", "q"])  # "xy" held for xyz, then "yq" completes
    assert hit and "".join(out) == "wx"


def test_a_stop_at_the_very_start():
    out, hit, n = feed(["###"], ["#", "##", "more"])
    assert hit and n == 2 and out == ["", ""]


@pytest.mark.parametrize("text,stops,expected", [
    ("hello", ["lox"], 2), ("hello", ["xyz"], 0), ("hello", ["o!", "lo!"], 2),
    ("aaa", ["aaaa"], 3), ("stop", ["stop"], 0),  # a whole stop is found, not held
    ("", ["a"], 0),
])
def test_held_suffix_len(text, stops, expected):
    assert held_suffix_len(text, stops) == expected


def test_first_stop():
    assert first_stop("abcabc", ["c", "b"]) == 1
    assert first_stop("abc", ["x"]) is None
