"""The stop-word tail buffer and the UTF-8 stream decoder, fed the way the engine feeds them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.generation.textstream import StopBuffer, Utf8Decoder, earliest_stop


def reference_cut(text: str, stops: list[str]) -> str:
    """What the client must receive: everything before the earliest stop string."""
    cut = earliest_stop(text, stops)
    return text if cut < 0 else text[:cut]


def run_pipeline(pieces: list[bytes], stops: list[str]) -> tuple[str, list[str]]:
    """Feed byte pieces through decoder + stop buffer as the server does; return text and the deltas."""
    decoder, buffer, deltas = Utf8Decoder(), StopBuffer(stops), []
    for piece in pieces:
        delta = buffer.push(decoder.feed(piece))
        if delta:
            deltas.append(delta)
        if buffer.stopped:
            return "".join(deltas), deltas
    tail = buffer.push(decoder.flush()) + buffer.flush()
    if tail:
        deltas.append(tail)
    return "".join(deltas), deltas


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def test_stop_string_is_cut_exactly_and_never_sent():
    text, _ = run_pipeline([b"Hello wor", b"ld. STO", b"P and more"], ["STOP"])
    assert text == "Hello world. "


def test_earliest_of_several_stop_strings_wins():
    text, _ = run_pipeline([b"abc", b"defg"], ["efg", "cd"])
    assert text == "ab"


def test_only_a_possible_stop_prefix_is_held_back():
    buffer = StopBuffer(["</end>"])
    assert buffer.push("hello </") == "hello "
    assert buffer.push("b> ok") == "</b> ok"
    assert buffer.push("<") == ""
    assert buffer.flush() == "<"


def test_text_without_stop_strings_is_released_at_once():
    buffer = StopBuffer([])
    assert buffer.push("abc") == "abc"


def test_emoji_split_over_four_byte_tokens_arrives_whole():
    _, deltas = run_pipeline([b"hi \xf0", b"\x9f", b"\x91", b"\x8b", b"!"], [])
    assert "".join(deltas) == "hi 👋!"
    assert all("\ufffd" not in d for d in deltas)


def test_character_right_before_a_stop_string_is_not_lost():
    text, _ = run_pipeline([b"\xe4\xbd", b"\xa0\xe5\xa5\xbd", b"STOP"], ["STOP"])
    assert text == "你好"


def test_unfinished_character_at_the_end_is_reported_not_dropped():
    text, _ = run_pipeline([b"ok \xf0\x9f"], [])
    assert text == "ok \ufffd"


def test_deltas_are_never_empty():
    _, deltas = run_pipeline([b"a", b"", b"\xf0", b"\x9f\x91\x8b", b"S", b"T"], ["STX"])
    assert deltas and all(deltas)


text_alphabet = st.sampled_from(list("abc ST\n") + ["é", "你", "👋", "\ufffd"])


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet=text_alphabet, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    stops=st.lists(st.text(alphabet=text_alphabet, min_size=1, max_size=4), max_size=3),
)
def test_any_split_and_any_stops_give_the_reference_cut(text, cuts, stops):
    data = text.encode("utf-8")
    emitted, deltas = run_pipeline(split_at(data, cuts), stops)
    assert emitted == reference_cut(text, stops)
    assert all(deltas)
    assert not any(stop in emitted for stop in stops)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=60), cuts=st.lists(st.integers(min_value=0, max_value=100), max_size=20))
def test_decoder_output_for_any_bytes_and_any_split_equals_a_whole_decode(data, cuts):
    decoder = Utf8Decoder()
    text = "".join(decoder.feed(piece) for piece in split_at(data, cuts)) + decoder.flush()
    assert text == data.decode("utf-8", errors="replace")
