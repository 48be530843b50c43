"""The tool-call extractor on scripted text streams, split at every possible place."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.dialects.hermes import ContentDelta, ToolCallArguments, ToolCallExtractor, ToolCallStart

FUNCTIONS = {"get_weather", "add"}
CALL_1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "tags": ["a}", {"x": "\\"}"}]}}\n</tool_call>'
CALL_2 = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
ARGS_1 = '{"city": "Paris", "tags": ["a}", {"x": "\\"}"}]}'
ARGS_2 = '{"a": 1, "b": 2}'


def extract(pieces: list[str], *, incremental: bool = True, max_calls: int | None = None) -> list:
    extractor = ToolCallExtractor(FUNCTIONS, incremental=incremental, max_calls=max_calls)
    events = []
    for piece in pieces:
        events.extend(extractor.push(piece))
    return events + extractor.finish()


def summary(events: list) -> tuple[str, list[tuple[int, str, str]]]:
    """(content, [(index, name, arguments)]) with ids checked to be unique per call."""
    content, calls, ids = "", [], []
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            content += event.text
        elif isinstance(event, ToolCallStart):
            assert event.index == len(calls) and event.id.startswith("call_") and event.id not in ids
            ids.append(event.id)
            calls.append([event.index, event.name, ""])
        else:
            assert isinstance(event, ToolCallArguments) and event.index == calls[-1][0]
            calls[-1][2] += event.fragment
    return content, [tuple(call) for call in calls]


def every_split(text: str) -> list[list[str]]:
    return [[text[:i], text[i:]] for i in range(len(text) + 1)]


@pytest.mark.parametrize("incremental", [True, False])
def test_text_then_two_calls(incremental):
    content, calls = summary(extract(["Let me check. ", CALL_1, "\n", CALL_2], incremental=incremental))
    assert content == "Let me check."  # white space before a call is layout
    assert calls == [(0, "get_weather", ARGS_1), (1, "add", ARGS_2)]


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("pieces", every_split("Hi " + CALL_1 + " bye"))
def test_tags_split_at_every_position(pieces, incremental):
    assert summary(extract(pieces, incremental=incremental)) == ("Hi bye", [(0, "get_weather", ARGS_1)])


def test_one_character_at_a_time_streams_arguments_in_fragments():
    events = extract(list(CALL_1 + CALL_2))
    assert summary(events)[1] == [(0, "get_weather", ARGS_1), (1, "add", ARGS_2)]
    assert sum(isinstance(e, ToolCallArguments) for e in events) > 10
    assert not any(isinstance(e, ContentDelta) for e in events)


def test_name_and_id_are_sent_once_and_before_arguments():
    events = extract(list(CALL_1))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert len(starts) == 1 and isinstance(events[0], ToolCallStart)


def test_partial_tag_never_reaches_content():
    events = extract(["Hello <", "tool", "_ca", "ll>", '{"name": "add", "arguments": {}}', "</tool_call>"])
    assert all("<" not in e.text for e in events if isinstance(e, ContentDelta))


def test_text_that_only_looks_like_a_tag_is_released_at_the_end():
    assert summary(extract(["a <tool", "_cal"])) == ("a <tool_cal", [])


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("block", [
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # unknown function
    '<tool_call>not json at all</tool_call>',
    '<tool_call>["add", {}]</tool_call>',
])
def test_malformed_block_before_any_delta_is_returned_as_content(block, incremental):
    assert summary(extract(["x ", block, " y"], incremental=incremental)) == ("x " + block + " y", [])


def test_broken_arguments_after_a_streamed_name_stay_a_call():
    # Streaming already sent the name and the arguments so far; they cannot be taken back.
    block = '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>'
    assert summary(extract([block])) == ("", [(0, "add", '{"a": 1')])


def test_malformed_arguments_are_returned_as_content_when_not_streaming():
    block = '<tool_call>{"name": "add", "arguments": {"a": </tool_call>'
    assert summary(extract([block], incremental=False)) == (block, [])


def test_other_key_order_still_yields_the_call():
    block = '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>'
    assert summary(extract(list(block))) == ("", [(0, "add", '{"a": 1}')])


def test_arguments_given_as_a_json_string_are_passed_through():
    block = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert summary(extract([block])) == ("", [(0, "add", '{"a": 1}')])


@pytest.mark.parametrize("incremental", [True, False])
def test_parallel_calls_off_keeps_only_the_first(incremental):
    assert summary(extract([CALL_1, CALL_2], incremental=incremental, max_calls=1))[1] == [(0, "get_weather", ARGS_1)]


@pytest.mark.parametrize("incremental", [True, False])
def test_unclosed_block_without_a_name_is_dropped_never_content(incremental):
    # The README's promise: partial markup never reaches content (a forced call cut by max_tokens).
    assert summary(extract(["Let me see. ", '<tool_call>{"na'], incremental=incremental)) == ("Let me see.", [])
    assert summary(extract(["<tool_call>"], incremental=incremental)) == ("", [])


@pytest.mark.parametrize("incremental", [True, False])
def test_call_cut_off_mid_arguments_stays_a_call_with_the_arguments_so_far(incremental):
    cut = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os'
    assert summary(extract([cut], incremental=incremental)) == ("", [(0, "get_weather", '{"city": "Os')])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=400), max_size=15), st.booleans())
def test_any_split_gives_the_same_calls_and_content(cuts, incremental):
    text = "Sure: " + CALL_1 + "\n" + CALL_2 + " ok"
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(points, points[1:])]
    assert summary(extract(pieces, incremental=incremental)) == (
        "Sure: ok", [(0, "get_weather", ARGS_1), (1, "add", ARGS_2)])
