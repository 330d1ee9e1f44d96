"""Stop sequences across token boundaries."""

from rbee_fleet.worker.stops import StopMatcher


def feed_all(matcher, pieces):
    out, hit = [], False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(matcher.flush())
    return "".join(out), hit


def test_stop_split_across_pieces_is_never_emitted():
    text, hit = feed_all(StopMatcher(["END"]), ["Hello E", "N", "D and more"])
    assert (text, hit) == ("Hello ", True)


def test_partial_stop_that_does_not_complete_is_released():
    m = StopMatcher(["END"])
    assert m.feed("abc EN") == ("abc ", False)
    assert m.feed("x") == ("ENx", False)


def test_earliest_of_several_stops_wins():
    text, hit = feed_all(StopMatcher(["\n\n", "world"]), ["hello world\n\nbye"])
    assert (text, hit) == ("hello ", True)


def test_no_stops_passes_through():
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""


def test_held_text_is_flushed_at_the_end():
    text, hit = feed_all(StopMatcher(["STOP"]), ["the end ST"])
    assert (text, hit) == ("the end ST", False)
