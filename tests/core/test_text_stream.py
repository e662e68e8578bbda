"""Stop sequences and UTF-8 reassembly over a token stream."""

from __future__ import annotations

import pytest

from jarvis.text_stream import StopSequenceMatcher, TokenTextDecoder


def run(stops, pieces):
    matcher = StopSequenceMatcher(stops)
    shown = [matcher.feed(p) for p in pieces]
    return shown, matcher.flush(), matcher.stopped


@pytest.mark.parametrize("pieces", [["Hello wor", "ld. END", " more"], ["Hello world. E", "N", "D more"],
                                    list("Hello world. END more")])
def test_stop_cuts_at_the_first_match_however_the_text_is_split(pieces):
    shown, tail, stopped = run(["END"], pieces)
    assert "".join(shown) + tail == "Hello world. "
    assert stopped


def test_a_partial_stop_is_held_back_then_released():
    matcher = StopSequenceMatcher(["</s>"])
    assert matcher.feed("a </") == "a "
    assert matcher.feed("b") == "</b"
    assert not matcher.stopped


def test_held_tail_is_flushed_when_generation_ends():
    shown, tail, stopped = run(["STOP"], ["x ST"])
    assert shown == ["x "] and tail == "ST" and not stopped


def test_earliest_of_several_stops_wins():
    shown, _, _ = run(["b", "abc"], ["xxabc"])
    assert shown == ["xx"]  # "abc" starts before "b"


def test_no_stops_passes_everything():
    assert run([], ["a", "b"]) == (["a", "b"], "", False)


def test_utf8_split_across_tokens_is_reassembled():
    data = "héllo 世界 🙂".encode()
    decoder = TokenTextDecoder()
    out = "".join(decoder.feed(data[i:i + 1]) for i in range(len(data))) + decoder.flush()
    assert out == "héllo 世界 🙂"


def test_incomplete_utf8_at_the_end_is_replaced_not_dropped():
    decoder = TokenTextDecoder()
    assert decoder.feed("é".encode()[:1]) == ""
    assert decoder.flush() == "\ufffd"


def _reference(stops, pieces):
    """The matcher's contract, brute force: show what no stop can still begin; cut at the earliest stop."""
    stops = [s for s in stops if s]
    shown, pending = [], ""
    for piece in pieces:
        buffer = pending + piece
        cuts = [buffer.find(s) for s in stops if s in buffer]
        if cuts:
            shown.append(buffer[:min(cuts)])
            return shown, "", True
        hold = max((n for n in range(1, len(buffer) + 1) if any(s.startswith(buffer[-n:]) for s in stops)),
                   default=0)
        shown.append(buffer[:len(buffer) - hold])
        pending = buffer[len(buffer) - hold:]
    return shown, pending, False


def test_matcher_agrees_with_brute_force_on_random_streams():
    import random

    rng = random.Random(1234)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab<>") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("ab<> ") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        shown, tail, stopped = run(stops, pieces)
        expected_shown, expected_tail, expected_stopped = _reference(stops, pieces)
        assert (shown[:len(expected_shown)], tail, stopped) == (expected_shown, expected_tail, expected_stopped), \
            (stops, pieces)
        assert all(s == "" for s in shown[len(expected_shown):])  # nothing is shown after a stop
