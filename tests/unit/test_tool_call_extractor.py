"""The tool-call extractors on scripted text streams, split at every possible place.

The contract every dialect keeps (content apart, tags never leaking, indexes, max_calls, malformed
and cut-off blocks) runs on each dialect's own markup; Hermes' particulars follow. The Qwen XML
dialect's own cases are in test_dialect_qwen_xml.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.dialects import hermes, qwen_xml
from edge_server.dialects.dialect import ToolDialect
from edge_server.dialects.hermes import ContentDelta, ToolCallArguments, ToolCallExtractor, ToolCallStart

FUNCTIONS = {"get_weather", "add"}
CALL_1 = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "tags": ["a}", {"x": "\\"}"}]}}\n</tool_call>'
CALL_2 = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
ARGS_1 = '{"city": "Paris", "tags": ["a}", {"x": "\\"}"}]}'
ARGS_2 = '{"a": 1, "b": 2}'

XML_FUNCTIONS = {
    "get_weather": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"},
                                                                           "days": {"type": "integer"}}},
    "write_file": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}}},
    "ping": None,
}
XML_CALL_1 = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n" \
             "</parameter>\n</function>\n</tool_call>"
XML_ARGS_1 = '{"city": "Paris", "days": 3}'
# A file's text keeps its inner newlines, indentation and markup, a closing tool-call tag included.
FILE_TEXT = "\n<b>bold</b>\n\n    indented </tool_call> x < y\n"
XML_CALL_2 = f"<tool_call>\n<function=write_file>\n<parameter=path>\n/tmp/a.html\n</parameter>\n" \
             f"<parameter=content>\n{FILE_TEXT}\n</parameter>\n</function>\n</tool_call>"
XML_ARGS_2 = json.dumps({"path": "/tmp/a.html", "content": FILE_TEXT}, ensure_ascii=False)


@dataclass(frozen=True)
class Markup:
    """One dialect's test material: two calls, blocks it cannot read, a call cut off mid-arguments, and
    one whose markup breaks after its name and some arguments."""

    dialect: ToolDialect
    functions: dict
    calls: tuple[tuple[str, str, str], ...]  # (block, name, arguments)
    malformed: tuple[str, ...]
    cut: tuple[str, str]  # (block cut off, its arguments so far)
    broken: tuple[str, str, str]  # (block, name, the arguments streamed before the break)

    def extract(self, pieces: list[str], *, incremental: bool = True, max_calls: int | None = None) -> list:
        return run(self.dialect.extractor(self.functions, max_calls=max_calls, incremental=incremental), pieces)

    def expected(self, *numbers: int) -> list[tuple[int, str, str]]:
        return [(index, self.calls[n][1], self.calls[n][2]) for index, n in enumerate(numbers)]


HERMES = Markup(hermes.DIALECT, dict.fromkeys(FUNCTIONS), ((CALL_1, "get_weather", ARGS_1), (CALL_2, "add", ARGS_2)), (
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # unknown function
    '<tool_call>not json at all</tool_call>',
    '<tool_call>["add", {}]</tool_call>',
), ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', '{"city": "Os'),
    ('<tool_call>{"name": "add", "arguments": {"a": 1</tool_call>', "add", '{"a": 1'))
QWEN_XML = Markup(qwen_xml.DIALECT, XML_FUNCTIONS, (
    (XML_CALL_1, "get_weather", XML_ARGS_1), (XML_CALL_2, "write_file", XML_ARGS_2)), (
    "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>",  # unknown function
    "<tool_call>\nnot xml at all\n</tool_call>",
    '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>',  # the Hermes form
    "<tool_call>\n<function=get_weather\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>",
), ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n1",
    '{"city": "Oslo"'),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\noops\n</tool_call>",
     "get_weather", '{"city": "Paris"'))
DIALECTS = pytest.mark.parametrize("markup", [HERMES, QWEN_XML], ids=lambda m: m.dialect.name)


def run(extractor, pieces: list[str]) -> list:
    """Every event of `extractor` fed `pieces`, then finished."""
    events = []
    for piece in pieces:
        events.extend(extractor.push(piece))
    return events + extractor.finish()


def extract(pieces: list[str], *, incremental: bool = True, max_calls: int | None = None) -> list:
    return run(ToolCallExtractor(FUNCTIONS, incremental=incremental, max_calls=max_calls), pieces)


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


@DIALECTS
@pytest.mark.parametrize("incremental", [True, False])
def test_text_then_two_calls(markup, incremental):
    content, calls = summary(markup.extract(["Let me check. ", markup.calls[0][0], "\n", markup.calls[1][0]],
                                            incremental=incremental))
    assert content == "Let me check."  # white space before a call is layout
    assert calls == markup.expected(0, 1)


@DIALECTS
@pytest.mark.parametrize("incremental", [True, False])
def test_tags_split_at_every_position(markup, incremental):
    for pieces in every_split("Hi " + markup.calls[0][0] + " bye"):
        assert summary(markup.extract(pieces, incremental=incremental)) == ("Hi bye", markup.expected(0))


@DIALECTS
def test_name_and_id_are_sent_once_and_before_arguments(markup):
    events = markup.extract(list(markup.calls[0][0]))
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert len(starts) == 1 and isinstance(events[0], ToolCallStart)
    assert not any(isinstance(e, ContentDelta) for e in events)


@DIALECTS
def test_text_that_only_looks_like_a_tag_is_released_at_the_end(markup):
    assert summary(markup.extract(["a <tool", "_cal"])) == ("a <tool_cal", [])


@DIALECTS
@pytest.mark.parametrize("incremental", [True, False])
def test_malformed_block_before_any_delta_is_returned_as_content(markup, incremental):
    for block in markup.malformed:
        assert summary(markup.extract(["x ", block, " y"], incremental=incremental)) == ("x " + block + " y", [])


@DIALECTS
@pytest.mark.parametrize("incremental", [True, False])
def test_parallel_calls_take_indexes_and_max_calls_keeps_the_first(markup, incremental):
    blocks = [markup.calls[0][0], markup.calls[1][0], markup.calls[0][0]]
    assert summary(markup.extract(blocks, incremental=incremental))[1] == markup.expected(0, 1, 0)
    assert summary(markup.extract(blocks[:2], incremental=incremental, max_calls=1))[1] == markup.expected(0)


@DIALECTS
@pytest.mark.parametrize("incremental", [True, False])
def test_unclosed_block_without_a_name_is_dropped_never_content(markup, incremental):
    # The README's promise: partial markup never reaches content (a forced call cut by max_tokens).
    unnamed = markup.cut[0][: markup.cut[0].index("get_") + 2]
    assert summary(markup.extract(["Let me see. ", unnamed], incremental=incremental)) == ("Let me see.", [])
    assert summary(markup.extract(["<tool_call>"], incremental=incremental)) == ("", [])


@DIALECTS
@pytest.mark.parametrize("incremental", [True, False])
def test_call_cut_off_mid_arguments_stays_a_call_with_the_arguments_so_far(markup, incremental):
    assert summary(markup.extract([markup.cut[0]], incremental=incremental)) == (
        "", [(0, "get_weather", markup.cut[1])])


@DIALECTS
def test_broken_markup_after_a_streamed_name_stays_a_call(markup):
    # Streaming already sent the name and the arguments so far; they cannot be taken back.
    block, name, streamed = markup.broken
    assert summary(markup.extract([block])) == ("", [(0, name, streamed)])


@DIALECTS
def test_broken_markup_is_returned_as_content_when_not_streaming(markup):
    assert summary(markup.extract([markup.broken[0]], incremental=False)) == (markup.broken[0], [])


@DIALECTS
@settings(max_examples=300, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=20), incremental=st.booleans())
def test_any_split_gives_the_same_calls_and_content(markup, cuts, incremental):
    text = "Sure: " + markup.calls[0][0] + "\n" + markup.calls[1][0] + " ok"
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in zip(points, points[1:])]
    assert summary(markup.extract(pieces, incremental=incremental)) == ("Sure: ok", markup.expected(0, 1))


def test_one_character_at_a_time_streams_arguments_in_fragments():
    events = extract(list(CALL_1 + CALL_2))
    assert summary(events)[1] == [(0, "get_weather", ARGS_1), (1, "add", ARGS_2)]
    assert sum(isinstance(e, ToolCallArguments) for e in events) > 10
    assert not any(isinstance(e, ContentDelta) for e in events)


def test_partial_tag_never_reaches_content():
    events = extract(["Hello <", "tool", "_ca", "ll>", '{"name": "add", "arguments": {}}', "</tool_call>"])
    assert all("<" not in e.text for e in events if isinstance(e, ContentDelta))


def test_other_key_order_still_yields_the_call():
    block = '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>'
    assert summary(extract(list(block))) == ("", [(0, "add", '{"a": 1}')])


def test_arguments_given_as_a_json_string_are_passed_through():
    block = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert summary(extract([block])) == ("", [(0, "add", '{"a": 1}')])
