"""The Qwen XML tool-call extractor (Qwen3-Coder, Qwen3.5): typing, strings, tags (the contract every dialect
keeps runs on it in test_tool_call_extractor.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.dialects.hermes import ContentDelta, ToolCallArguments, ToolCallStart
from edge_server.dialects.qwen_xml import DIALECT, XmlToolCallExtractor, typed_value
from tests.unit.test_tool_call_extractor import XML_ARGS_1, XML_CALL_1, XML_FUNCTIONS, run, summary

WEATHER = {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
    "ratio": {"type": "number"}, "tags": {"type": "array", "items": {"type": "string"}},
    "options": {"type": "object"}, "note": {"type": ["string", "null"]}, "unit": {"$ref": "#/$defs/unit"}},
    "$defs": {"unit": {"enum": ["c", "f", 1]}}}
FUNCTIONS = {**XML_FUNCTIONS, "get_weather": WEATHER}
CALL_1, ARGS_1 = XML_CALL_1, XML_ARGS_1


def extract(pieces: list[str], *, incremental: bool = True) -> list:
    return run(XmlToolCallExtractor(FUNCTIONS, incremental=incremental), pieces)


def arguments_of(text: str, function: str = "get_weather") -> dict:
    """The parsed arguments of the one call in a block calling `function` with `text`'s parameters."""
    content, calls = summary(extract([f"<tool_call>\n<function={function}>\n{text}</function>\n</tool_call>"]))
    assert content == "" and len(calls) == 1
    return json.loads(calls[0][2])


def parameter(name: str, value: str) -> str:
    return f"<parameter={name}>\n{value}\n</parameter>\n"


def test_one_character_at_a_time_streams_one_fragment_per_parameter():
    events = extract(list(CALL_1))
    assert [type(e) for e in events] == [ToolCallStart, ToolCallArguments, ToolCallArguments, ToolCallArguments]
    assert [e.fragment for e in events[1:]] == ['{"city": "Paris"', ', "days": 3', "}"]
    assert events[0].index == 0 and events[0].name == "get_weather" and events[0].id.startswith("call_")


def test_the_name_goes_out_as_soon_as_the_function_tag_ends():
    extractor = XmlToolCallExtractor(FUNCTIONS)
    assert extractor.push("<tool_call>\n<function=get_weather") == []
    [start] = extractor.push(">\n<parameter=city>\nPar")
    assert isinstance(start, ToolCallStart) and start.name == "get_weather"
    assert extractor.push("is\n</parameter") == []
    assert extractor.push(">") == [ToolCallArguments(0, '{"city": "Paris"')]


@pytest.mark.parametrize("name, text, expected", [
    ("days", "3", 3),
    ("days", " 42 ", 42),
    ("days", "3.0", 3),
    ("days", "three", "three"),  # does not parse: stays the text
    ("days", "3.5", "3.5"),
    ("ratio", "0.25", 0.25),
    ("ratio", "7", 7),
    ("ratio", "NaN", "NaN"),  # not JSON
    ("metric", "true", True),
    ("metric", "False", False),  # Jinja's `| string` of a Python bool
    ("metric", "yes", "yes"),
    ("tags", '["a", "b"]', ["a", "b"]),
    ("tags", "[1,", "[1,"),
    ("options", '{"deep": {"x": [1, null]}}', {"deep": {"x": [1, None]}}),
    ("city", "42", "42"),  # a string stays the text, even when it looks like JSON
    ("city", '"quoted"', '"quoted"'),
    ("city", "null", "null"),
    ("note", "null", None),
    ("note", "None", None),
    ("note", "a note", "a note"),
    ("note", "12", "12"),  # string or null: a number is not among its types
    ("unit", "c", "c"),  # through $ref, an enum of strings and a number
    ("unit", "1", 1),
    ("undeclared", "5", 5),  # not in the schema: any value
    ("undeclared", "five", "five"),
])
def test_values_are_typed_by_the_schema(name, text, expected):
    value = arguments_of(parameter(name, text))[name]
    assert value == expected and type(value) is type(expected)


def test_untyped_schema_parses_json_and_keeps_other_text():
    root = {"properties": {"any": {}}}
    assert typed_value("5", {}, root) == 5 and typed_value("[1]", {}, root) == [1]
    assert typed_value("hello", {}, root) == "hello" and typed_value('"hi"', {}, root) == '"hi"'
    assert typed_value("9" * 5000, {"type": "integer"}, root) == "9" * 5000  # past Python's digit limit
    assert typed_value("[" * 100000, {"type": "array"}, root) == "[" * 100000


def test_cyclic_refs_do_not_loop():
    root = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}}
    assert typed_value("5", {"$ref": "#/$defs/a"}, root) == 5


@pytest.mark.parametrize("value", ["", "one line", "two\nlines", "\nleading newline", "trailing newline\n",
                                   "\n\nblank lines around\n\n", "  spaces kept  ", "tab\there"])
def test_strings_keep_everything_but_the_one_newline_on_each_side(value):
    assert arguments_of(parameter("content", value), "write_file") == {"content": value}


def test_value_without_the_format_newlines_is_taken_as_written():
    assert arguments_of("<parameter=city>Paris</parameter>") == {"city": "Paris"}


def test_call_without_parameters_has_empty_arguments():
    assert summary(extract(["<tool_call>\n<function=ping>\n</function>\n</tool_call>"])) == ("", [(0, "ping", "{}")])


def test_partial_tags_never_reach_content():
    events = extract(["Hello <", "tool", "_ca", "ll>", "\n<func", "tion=get_weather>\n<param", "eter=city>\nParis\n</p",
                      "arameter>\n</fun", "ction>\n</tool", "_call>"])
    assert summary(events) == ("Hello", [(0, "get_weather", '{"city": "Paris"}')])
    assert all("<" not in e.text for e in events if isinstance(e, ContentDelta))


def test_function_tag_outside_a_block_is_content():
    text = "Use <function=get_weather> like this."
    assert summary(extract([text])) == (text, [])


def test_closing_tool_call_tag_inside_a_value_belongs_to_the_value():
    assert arguments_of(parameter("content", "a </tool_call> b"), "write_file") == {"content": "a </tool_call> b"}


def test_missing_function_close_is_forgiven():
    block = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</tool_call> after"
    assert summary(extract([block])) == (" after", [(0, "get_weather", '{"city": "Rome"}')])


def test_text_after_the_function_inside_the_block_is_ignored():
    block = "<tool_call>\n<function=ping>\n</function>\nstray words\n</tool_call>"
    assert summary(extract([block], incremental=False)) == ("", [(0, "ping", "{}")])


@pytest.mark.parametrize("incremental", [True, False])
def test_call_cut_off_after_its_function_closed_is_whole(incremental):
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool"
    assert summary(extract([cut], incremental=incremental)) == ("", [(0, "get_weather", '{"city": "Oslo"}')])


def test_endless_name_breaks_the_block_instead_of_waiting():
    extractor = XmlToolCallExtractor(FUNCTIONS, incremental=False)
    extractor.push("<tool_call>\n<function=" + "x" * 300)
    assert summary(extractor.push("</tool_call>") + extractor.finish())[0].startswith("<tool_call>\n<function=xxx")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["path", "content"]), st.text(min_size=0, max_size=40).filter(
    lambda s: "</parameter>" not in s), min_size=1), st.integers(min_value=1, max_value=40))
def test_written_arguments_come_back_exactly(arguments, chunk):
    body = "".join(parameter(name, value) for name, value in arguments.items())
    text = f"<tool_call>\n<function=write_file>\n{body}</function>\n</tool_call>"
    pieces = [text[i : i + chunk] for i in range(0, len(text), chunk)]
    [(_, _, raw)] = summary(extract(pieces))[1]
    assert json.loads(raw) == arguments


def test_the_dialect_builds_this_extractor():
    extractor = DIALECT.extractor(FUNCTIONS, max_calls=None, incremental=True)
    assert isinstance(extractor, XmlToolCallExtractor)
    assert summary(extractor.push(CALL_1) + extractor.finish()) == ("", [(0, "get_weather", ARGS_1)])
