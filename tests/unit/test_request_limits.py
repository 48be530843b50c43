"""Bounds on bodies and JSON schemas: every hostile shape is a fast 400 naming the place and the limit."""

from __future__ import annotations

import json

import llama_cpp
import pytest

from edge_server.api.bodylimits import MAX_ARRAY_ITEMS, MAX_JSON_DEPTH, MAX_JSON_VALUES
from edge_server.api.errors import APIError
from edge_server.dialects.constraints import schema_grammar, tool_call_grammar
from edge_server.dialects.schemalimits import (
    MAX_ALTERNATIVES,
    MAX_REPETITION,
    MAX_STRING_LENGTH,
    SchemaRefused,
    check_schema_limits,
)
from edge_server.api.schemas import ChatCompletionRequest, CompletionRequest, parse_body
from tests.unit.test_dialect_grammars import Vocab

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def vocab(tiny_model):
    """The tiny model's vocabulary, grammars run on it as the engine runs them."""
    loaded = Vocab(tiny_model)
    yield loaded
    llama_cpp.llama_model_free(loaded.model)


def refusal(call, *args, **kwargs) -> APIError | SchemaRefused:
    """The error `call` refuses with: a 400 APIError (bodies) or a SchemaRefused (schemas, a 400 on the wire)."""
    with pytest.raises((APIError, SchemaRefused)) as caught:
        call(*args, **kwargs)
    assert getattr(caught.value, "status", 400) == 400
    return caught.value


# ---- schemas ------------------------------------------------------------------------------------

OVERSIZED_SCHEMAS = [
    ("pattern a{1,20000}", {"type": "string", "pattern": "^a{1,20000}$"}, "{1,20000}"),
    ("pattern [a-z]{3,100000}", {"type": "string", "pattern": "^[a-z]{3,100000}$"}, "{3,100000}"),
    ("nested quantifiers", {"type": "string", "pattern": "^(x{1,2}){1,1000000}$"}, "{1,1000000}"),
    ("underscored count", {"type": "string", "pattern": "^x{1_000_000}$"}, "{1_000_000}"),
    ("spaced and signed count", {"type": "string", "pattern": "^x{ +5000 , }$"}, "{ +5000 , }"),
    ("maxLength", {"type": "string", "maxLength": 100000}, "'maxLength' is 100000"),
    ("maxItems", {"type": "array", "items": {"type": "integer"}, "maxItems": 1000000}, "'maxItems' is 1000000"),
    ("minItems", {"type": "array", "items": {"type": "integer"}, "minItems": 5000}, "'minItems' is 5000"),
    ("enum of 20,000", {"enum": [f"v{i}" for i in range(20000)]}, "alternatives"),
    ("anyOf branches", {"anyOf": [{"const": i} for i in range(MAX_ALTERNATIVES + 1)]}, "alternatives"),
    ("deep nesting", json.loads('{"type": "array", "items": ' * 40 + '{"type": "integer"}' + "}" * 40), "nests"),
    ("long pattern", {"type": "string", "pattern": "^" + "a" * 2000 + "$"}, "characters"),
    ("many properties", {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}},
     "properties"),
]


@pytest.mark.parametrize("name, schema, named", OVERSIZED_SCHEMAS, ids=[case[0] for case in OVERSIZED_SCHEMAS])
def test_oversized_schema_is_refused_naming_the_limit(name, schema, named):
    error = refusal(schema_grammar, schema, param="response_format.json_schema.schema")
    assert error.code == "schema_too_large" and error.param == "response_format.json_schema.schema"
    assert named in error.message and "Limits:" in error.message


INVALID_SCHEMAS = [
    ("minLength above maxLength", {"type": "string", "minLength": 5, "maxLength": 2}, "'minLength' (5) is above"),
    ("minItems above maxItems", {"type": "array", "minItems": 3, "maxItems": 2}, "'minItems' (3) is above"),
    ("quantifier min above max", {"type": "string", "pattern": "^a{5,2}$"}, "minimum above its maximum"),
    ("count as a string", {"type": "string", "maxLength": "100000"}, "whole number"),
    ("negative count", {"type": "string", "minLength": -1}, "whole number"),
    ("stray ]", {"type": "string", "pattern": "^a]$"}, "unmatched ']'"),
    ("stray }", {"type": "string", "pattern": "^}$"}, "unmatched '}'"),
    ("negative quantifier", {"type": "string", "pattern": "^a{-5}$"}, "negative"),
]


@pytest.mark.parametrize("name, schema, named", INVALID_SCHEMAS, ids=[case[0] for case in INVALID_SCHEMAS])
def test_schema_that_would_hang_or_exhaust_llama_cpp_is_invalid(name, schema, named):
    # min above max made llama.cpp's repetition count wrap to 2^64 (memory ran out); a stray
    # closing bracket made the converter loop forever.
    error = refusal(schema_grammar, schema, param="p")
    assert error.code == "invalid_schema" and named in error.message


@pytest.mark.parametrize("pattern", ["^" + "a{0,1000}" * 110 + "$", "^((a{1,1000}){1,1000})$", "^(ab){1,600}$"],
                         ids=["many quantifiers", "nested quantifiers", "repeated group"])
def test_patterns_are_bounded_by_what_they_expand_to(pattern):
    # Each passed the per-quantifier bound, yet llama.cpp then took seconds per character.
    error = refusal(schema_grammar, {"type": "string", "pattern": pattern}, param="p")
    assert error.code == "schema_too_large" and "expands" in error.message


@pytest.mark.parametrize("pattern", [r"^\d{4}-\d{2}-\d{2}$", "^[a-z]{3,1000}$", "^a{0,500}b{0,500}$", "^(ab){1,400}$"])
def test_ordinary_patterns_pass(pattern):
    check_schema_limits({"type": "string", "pattern": pattern}, param="p")


def test_many_optional_properties_are_enforced_not_refused(vocab):
    # llama.cpp's converter cost the cube of an object's optional properties; llguidance compiles them in order.
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(80)},
              "additionalProperties": False}
    grammar = schema_grammar(schema, param="p")
    assert vocab.accepts(grammar, '{"p3":1,"p70":2}') and vocab.accepts(grammar, "{}")
    assert not vocab.accepts(grammar, '{"p70":2,"p3":1}')  # the schema's order
    assert not vocab.accepts(grammar, '{"p3":"x"}') and not vocab.accepts(grammar, '{"q":1}')


def test_each_tool_keeps_its_own_definitions(vocab):
    def tool(values):
        return {"type": "object", "properties": {"x": {"$ref": "#/$defs/Foo"}}, "required": ["x"],
                "$defs": {"Foo": {"enum": values}}}

    grammar = tool_call_grammar([("f", tool([1, 2])), ("g", tool(["A", "B"]))], several=False, param="t")
    assert vocab.accepts(grammar, call("f", '{"x": 2}')) and vocab.accepts(grammar, call("g", '{"x": "A"}'))
    assert not vocab.accepts(grammar, call("f", '{"x": "A"}')) and not vocab.accepts(grammar, call("g", '{"x": 1}'))


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_limits_follow_refs_anywhere_in_the_document():
    schema = {"$ref": "#/x/e", "x": {"e": {"enum": list(range(MAX_ALTERNATIVES + 1))}}}
    assert refusal(schema_grammar, schema, param="p").code == "schema_too_large"
    assert refusal(schema_grammar, {"type": "string", "pattern": "^\\\\{0,99999}$"}, param="p").code == \
        "schema_too_large"


def test_tools_with_their_own_defs_beside_a_structured_answer(vocab):
    item = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    parameters = {"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
                  "$defs": {"Item": item}}
    answer = {"type": "object", "properties": {"x": {"$ref": "#/$defs/X"}}, "$defs": {"X": {"enum": [1, 2]}}}
    grammar = tool_call_grammar([("f", parameters), ("g", parameters)], several=False, param="tool_choice",
                                answer=(answer, "rf"))
    assert vocab.accepts(grammar, call("g", '{"item": {"n": 4}}')) and vocab.accepts(grammar, '{"x":2}')
    assert not vocab.accepts(grammar, call("g", '{"item": {"n": "4"}}')) and not vocab.accepts(grammar, '{"x":3}')


def test_oversized_tool_parameters_are_refused_for_forced_calls():
    parameters = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 100000}}}
    error = refusal(tool_call_grammar, [("f", parameters)], several=False, param="tool_choice")
    assert error.param == "tool_choice" and "maxLength" in error.message


def test_schemas_at_the_limits_are_accepted():
    check_schema_limits({"type": "string", "pattern": f"^a{{1,{MAX_REPETITION}}}$"}, param="p")
    check_schema_limits({"type": "string", "maxLength": MAX_REPETITION}, param="p")
    check_schema_limits({"enum": list(range(MAX_ALTERNATIVES))}, param="p")
    check_schema_limits({"type": "string", "pattern": r"^\{99999\}$"}, param="p")  # escaped braces are literal


@pytest.mark.parametrize("schema, text", [
    (lambda n: {"type": "string", "maxLength": n}, lambda n: '"' + "a" * n + '"'),
    (lambda n: {"type": "string", "pattern": f"^[a-z]{{3,{n}}}$"}, lambda n: '"' + "a" * n + '"'),
    (lambda n: {"type": "array", "items": {"type": "integer"}, "maxItems": n}, lambda n: "[" + ",".join("1" * n) + "]"),
])
def test_repetition_at_the_limit_is_enforced_exactly(vocab, schema, text):
    grammar = schema_grammar(schema(MAX_REPETITION), param="p")
    assert vocab.accepts(grammar, text(MAX_REPETITION)) and not vocab.accepts(grammar, text(MAX_REPETITION + 1))


def test_string_lengths_up_to_64k_are_enforced_exactly(vocab):
    # Real schemas bound text columns at 65535 (MaskBench); llguidance counts characters in its lexer.
    grammar = schema_grammar({"type": "string", "minLength": 2, "maxLength": MAX_STRING_LENGTH}, param="p")
    text = '"' + "ab" * (MAX_STRING_LENGTH // 2) + '"'
    assert vocab.accepts(grammar, text) and not vocab.accepts(grammar, text[:-1] + 'a"')
    assert not vocab.accepts(grammar, '"a"')
    error = refusal(schema_grammar, {"type": "string", "maxLength": MAX_STRING_LENGTH + 1}, param="p")
    assert error.code == "schema_too_large" and str(MAX_STRING_LENGTH) in error.message


def test_tools_in_auto_mode_beside_a_schema_may_call_or_answer(vocab):
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = tool_call_grammar([("f", None)], several=True, param="tool_choice", answer=(answer, "rf"))
    assert vocab.accepts(grammar, call("f", "{}") + "\n" + call("f", '{"a": [1]}'))
    assert vocab.accepts(grammar, '{"ok":false}') and not vocab.accepts(grammar, "no")


def body(**fields) -> bytes:
    return json.dumps({"messages": USER, **fields}).encode()


@pytest.mark.parametrize("raw, param", [
    (json.dumps({"messages": [1] * 1_000_000}).encode(), "messages"),
    (body(tools=[1] * 1_000_000), "tools"),
    (body(stop=["x"] * (MAX_ARRAY_ITEMS + 1)), "stop"),
], ids=["million messages", "million tools", "long stop list"])
def test_huge_arrays_are_refused_before_validation(raw, param):
    error = refusal(parse_body, ChatCompletionRequest, raw)
    assert error.param == param and str(MAX_ARRAY_ITEMS) in error.message


def test_too_many_values_are_refused():
    many = [[0] * (MAX_ARRAY_ITEMS - 1) for _ in range(MAX_JSON_VALUES // (MAX_ARRAY_ITEMS - 1) + 1)]
    assert str(MAX_JSON_VALUES) in refusal(parse_body, ChatCompletionRequest, body(metadata=many)).message


def test_huge_objects_are_refused():
    keys = {f"k{i}": 0 for i in range(MAX_ARRAY_ITEMS + 1)}
    error = refusal(parse_body, ChatCompletionRequest, body(metadata=keys))
    assert error.param == "metadata" and f"{MAX_ARRAY_ITEMS + 1} keys" in error.message


@pytest.mark.parametrize("raw", [
    b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"messages":[{"role":"user","content":' + b"[" * 5000 + b"]" * 5000 + b"}]}",
    b'{"messages":[{"role":"user","content":' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}]}",
], ids=["100,000 deep", "content 5,000 deep", "just past the depth limit"])
def test_deep_nesting_is_a_400(raw):
    assert f"{MAX_JSON_DEPTH} levels" in refusal(parse_body, ChatCompletionRequest, raw).message


@pytest.mark.parametrize("model, raw, param", [
    (ChatCompletionRequest, b'{"messages":[{"role":"user","content":"a\\ud800b"}]}', "messages.0.content"),
    (ChatCompletionRequest, b'{"model":"\\udfff","messages":[{"role":"user","content":"ab"}]}', "model"),
    (CompletionRequest, b'{"prompt":"x\\udc00"}', "prompt"),
    (ChatCompletionRequest, b'{"messages":[{"role":"user","content":"x"}],"\\ud800":1}', None),
])
def test_lone_surrogates_are_a_400_naming_the_field(model, raw, param):
    error = refusal(parse_body, model, raw)
    assert error.param == param and "surrogate" in error.message


def test_surrogate_pairs_are_ordinary_text():
    request = parse_body(ChatCompletionRequest, b'{"messages":[{"role":"user","content":"\\ud83d\\ude00"}]}')
    assert request.messages[0].content == "\U0001F600"


@pytest.mark.parametrize("field", ["temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "top_k",
                                   "stream", "parallel_tool_calls", "stream_options"])
def test_explicit_null_means_the_default(field):
    request = parse_body(ChatCompletionRequest, body(**{field: None}))
    assert getattr(request, field) == ChatCompletionRequest.model_fields[field].get_default(call_default_factory=True)


def test_null_for_a_required_field_is_still_a_400():
    assert refusal(parse_body, ChatCompletionRequest, b'{"messages": null}').param == "messages"
