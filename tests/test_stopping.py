"""Stop strings cut streamed text exactly where cutting the whole text would, however it is split."""

from hypothesis import given
from hypothesis import strategies as st

from minigpt.stop_strings import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    if not m.stopped:
        out += m.flush()
    return out, m.stopped


def expected(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def test_stop_string_split_across_pieces_is_never_emitted():
    m = StopMatcher(["\n\n"])
    assert m.feed("Hello\n") == "Hello"  # "\n" could start the stop string: held back
    assert m.feed("\nWorld") == ""
    assert m.stopped


def test_false_start_is_released():
    m = StopMatcher(["END"])
    assert m.feed("the EN") == "the "
    assert m.feed("D") == ""
    m = StopMatcher(["END"])
    assert m.feed("the EN") == "the "
    assert m.feed("ter") == "ENter"
    assert m.flush() == ""


def test_held_text_flushed_at_end_of_stream():
    m = StopMatcher(["abc"])
    assert m.feed("xab") == "x"
    assert m.flush() == "ab"
    assert not m.stopped


def test_a_longer_stop_that_starts_earlier_is_waited_for():
    # found by hypothesis: "a" is in "\na", but "\naa" may still follow and starts earlier
    assert run(["\na", "a"], ["a", "\naa"]) == ("", True)
    assert run(["\na", "b"], ["a", "\naa"]) == ("\n", True)
    m = StopMatcher(["a", "\naa"])
    assert m.feed("\na") == ""  # undecided
    assert m.flush() == "\n" and m.stopped  # the stream ended: "a" was the stop


def test_earliest_of_several_stops_wins():
    assert run(["one two three"], ["three", "two"]) == ("one ", True)


@given(
    text=st.text(alphabet="ab\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_streamed_cut_equals_whole_text_cut(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert run(pieces, stops) == expected(text, stops)
