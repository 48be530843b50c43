"""The dialects' forced-call grammars, compiled by llguidance for a real vocabulary as the engine compiles them.

`accepts` walks the engine's matcher over the tokens of a text (special tokens as the model writes them),
and asks at the end whether the grammar lets the output stop there.
"""

from __future__ import annotations

import json

import llama_cpp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_server.dialects import hermes, qwen_xml
from edge_server.dialects.constraints import (
    after_reasoning,
    compile_matcher,
    lark_literal,
    schema_grammar,
    text_without,
    tool_call_grammar,
)
from edge_server.dialects.schemalimits import SchemaRefused
from edge_server.engine.vocab import Vocabulary
from tests.unit.test_tool_call_extractor import summary

WEATHER = {"type": "object", "required": ["city", "days"], "properties": {
    "city": {"type": "string"}, "days": {"type": "integer", "description": "how many"},
    "unit": {"enum": ["celsius", "fahrenheit"]}, "metric": {"type": "boolean"},
    "where": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
              "required": ["lat", "lon"]},
    "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}}, "note": {"type": ["string", "null"]},
    "level": {"enum": [1, 2, 3]}},
    "$defs": {"tag": {"type": "string", "maxLength": 8}}}
SIGNATURES = [("get_weather", WEATHER), ("anything", None)]


class Vocab:
    """A model's vocabulary, loaded alone, with llguidance's tokenizer built from it as the engine builds it."""

    def __init__(self, path):
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model
        self.vocabulary = Vocabulary(llama_cpp.llama_model_get_vocab(self.model))
        self.tokenizer = self.vocabulary.constraint_tokenizer()

    def tokens(self, text: str) -> list[int]:
        return self.vocabulary.tokenize(text.encode(), False, True)

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether the engine's matcher for `grammar` takes the tokens of `text` and then lets the output end."""
        matcher = compile_matcher(self.tokenizer, grammar)
        return matcher.consume_tokens(self.tokens(text)) and matcher.is_accepting()


@pytest.fixture(scope="module", params=["tiny", "qwen"])
def vocab(request, tiny_model, qwen_scripted_model):
    """The tiny model's vocabulary (tags written as text) and the real Qwen one (`<tool_call>` one special token)."""
    path = tiny_model if request.param == "tiny" else qwen_scripted_model("qwen3.5", "ok")
    loaded = Vocab(path)
    yield loaded
    llama_cpp.llama_model_free(loaded.model)


def xml_call(function: str, **parameters: str) -> str:
    body = "".join(f"<parameter={name}>\n{value}\n</parameter>\n" for name, value in parameters.items())
    return f"<tool_call>\n<function={function}>\n{body}</function>\n</tool_call>"


GOOD_CALLS = [
    xml_call("get_weather", city="Paris", days="3"),
    xml_call("get_weather", city="Paris\nTexas, <b>USA</b> </param", days="-12", unit="fahrenheit", metric="true",
             where='{"lat": 48.85, "lon": 2.35}', tags='["a", "bb"]', note="null", level="2"),
    xml_call("get_weather", city="", days="0", note="a\n\nmulti-line note\n"),
    xml_call("anything"),
    xml_call("anything", free="text\nhere", other="42"),
]
BAD_CALLS = [
    xml_call("get_weather", city="Paris"),  # a required parameter missing
    xml_call("get_weather", city="Paris", days="three"),  # not an integer
    xml_call("get_weather", city="Pa</parameter>ris", days="3"),  # a string cannot hold the closing tag
    xml_call("get_weather", city="Paris", days="3", unit="kelvin"),  # not in the enum
    xml_call("get_weather", city="Paris", days="3", where='{"lat": 1}'),  # the object lacks a required key
    xml_call("get_weather", city="Paris", days="3", tags='["much too long"]'),  # maxLength through $ref
    xml_call("get_weather", city="Paris", days="3", color="red"),  # not a declared parameter
    xml_call("rm_rf"),
    '{"name": "anything", "arguments": {}}',
    "Sure, " + xml_call("anything"),  # a forced call starts at once
]


@pytest.mark.parametrize("text", GOOD_CALLS)
def test_xml_grammar_accepts_valid_calls(vocab, text):
    assert vocab.accepts(qwen_xml.xml_call_grammar(SIGNATURES, several=False, param="tool_choice"), text)


@pytest.mark.parametrize("text", BAD_CALLS)
def test_xml_grammar_refuses_invalid_calls(vocab, text):
    assert not vocab.accepts(qwen_xml.xml_call_grammar(SIGNATURES, several=False, param="tool_choice"), text)


@pytest.mark.parametrize("text", GOOD_CALLS)
def test_what_the_grammar_admits_extracts_to_arguments_matching_the_schema(text):
    [(_, name, arguments)] = summary(qwen_xml.DIALECT.extractor(dict(SIGNATURES), max_calls=None, incremental=True)
                                     .push(text))[1]
    parsed = json.loads(arguments)
    if name == "get_weather":
        assert isinstance(parsed["city"], str) and isinstance(parsed["days"], int)
        assert all(isinstance(parsed[key], kind) for key, kind in [
            ("metric", bool), ("where", dict), ("tags", list), ("level", int)] if key in parsed)


def test_several_calls_only_when_parallel(vocab):
    two = xml_call("anything") + "\n" + xml_call("get_weather", city="Rome", days="1")
    assert vocab.accepts(qwen_xml.xml_call_grammar(SIGNATURES, several=True, param="t"), two)
    assert not vocab.accepts(qwen_xml.xml_call_grammar(SIGNATURES, several=False, param="t"), two)


def test_named_choice_admits_only_that_function(vocab):
    grammar = qwen_xml.DIALECT.call_grammar([("anything", None)], several=False, param="tool_choice")
    assert vocab.accepts(grammar, xml_call("anything", a="1"))
    assert not vocab.accepts(grammar, GOOD_CALLS[0])


def test_auto_beside_a_structured_answer_gives_a_call_or_the_answer(vocab):
    answer = ({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}, "response_format")
    grammar = qwen_xml.xml_call_grammar(SIGNATURES, several=True, param="tool_choice", answer=answer)
    assert vocab.accepts(grammar, GOOD_CALLS[0])
    assert vocab.accepts(grammar, '{"ok":true}')
    assert not vocab.accepts(grammar, '{"ok":1}')
    assert not vocab.accepts(grammar, '{"ok": true}')  # an answer is compact; calls are spaced as templates render them
    assert not vocab.accepts(grammar, xml_call("get_weather", city="Paris", days="3", where='{"lat":1,"lon":2}'))
    assert not vocab.accepts(grammar, "plain text")


def test_answer_beside_calls_whose_values_are_all_text(vocab):
    grammar = qwen_xml.xml_call_grammar([("anything", None)], several=False, param="t",
                                        answer=({"type": "object"}, "response_format"))
    assert vocab.accepts(grammar, '{"a":[1]}') and vocab.accepts(grammar, xml_call("anything"))


def test_tools_with_same_named_definitions_stay_apart(vocab):
    first = {"type": "object", "properties": {"x": {"$ref": "#/$defs/item"}}, "required": ["x"],
             "$defs": {"item": {"type": "integer"}}}
    second = {"type": "object", "properties": {"x": {"$ref": "#/$defs/item"}}, "required": ["x"],
              "$defs": {"item": {"type": "boolean"}}}
    grammar = qwen_xml.xml_call_grammar([("f", first), ("g", second)], several=False, param="t")
    assert vocab.accepts(grammar, xml_call("f", x="1")) and vocab.accepts(grammar, xml_call("g", x="true"))
    assert not vocab.accepts(grammar, xml_call("f", x="true"))


def test_names_and_values_with_grammar_syntax_are_escaped(vocab):
    schema = {"type": "object", "properties": {'q"\\[x]': {"enum": ['a"b', "c\\d", "tab\there", "-^]", ""]}},
              "required": ['q"\\[x]']}
    grammar = qwen_xml.xml_call_grammar([("f", schema)], several=False, param="t")
    for member in schema["properties"]['q"\\[x]']["enum"]:
        assert vocab.accepts(grammar, xml_call("f", **{'q"\\[x]': member}))


def test_schema_limits_apply_first():
    deep: dict = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(SchemaRefused) as refused:
        qwen_xml.xml_call_grammar([("f", deep)], several=False, param="tool_choice")
    assert refused.value.param == "tool_choice" and refused.value.code == "schema_too_large"
    with pytest.raises(SchemaRefused) as refused:
        qwen_xml.xml_call_grammar([("f", None)], several=False, param="tool_choice",
                                  answer=({"type": "object", "minItems": -1}, "response_format"))
    assert refused.value.param == "response_format"


def test_unconvertible_parameter_schema_is_refused():
    schema = {"type": "object", "properties": {"x": {"type": "integer", "$ref": "https://example.com/s.json"}}}
    with pytest.raises(SchemaRefused) as refused:
        qwen_xml.xml_call_grammar([("f", schema)], several=False, param="tool_choice")
    assert refused.value.code == "unsupported_schema"


def test_hermes_dialect_grammar_is_the_json_call_grammar(vocab):
    grammar = hermes.DIALECT.call_grammar(SIGNATURES, several=False, param="t")
    assert grammar == tool_call_grammar(SIGNATURES, several=False, param="t")
    assert vocab.accepts(grammar, '<tool_call>\n{"name": "anything", "arguments": {}}\n</tool_call>')
    assert not vocab.accepts(grammar, xml_call("anything"))


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="</parmet>x\n", max_size=30))
def test_text_without_admits_exactly_the_texts_lacking_the_word(vocab, text):
    grammar = "start: T\n" + text_without("T", "</parameter>")
    assert vocab.accepts(grammar, text) == ("</parameter>" not in text)


@pytest.mark.parametrize("word", ["aab", "abab", "[-]^\\", "\n\n"])
def test_text_without_handles_self_overlapping_and_special_words(vocab, word):
    grammar = "start: T\n" + text_without("T", word)
    assert vocab.accepts(grammar, "x" + word[:-1] + "y" + word[1:])
    assert not vocab.accepts(grammar, "x" + word[:-1] + word + "y")


def test_lark_literal_round_trips_every_special_character(vocab):
    text = 'quote " backslash \\ newline \n tab \t bell \x07 [x] /slash/ ü'
    assert vocab.accepts(f"start: {lark_literal(text)}", text)
    assert not vocab.accepts(f"start: {lark_literal(text)}", text[:-1])


def test_tags_are_the_vocabularys_special_tokens_or_their_text(vocab):
    grammar = hermes.DIALECT.call_grammar([("anything", None)], several=False, param="t")
    call = '<tool_call>\n{"name": "anything", "arguments": {}}\n</tool_call>'
    [tag] = vocab.tokens("<tool_call>")
    assert vocab.tokenizer.is_special_token(tag)  # an added token in both vocabularies
    assert vocab.accepts(grammar, call)
    spelled = [token for char in call for token in vocab.tokens(char)]
    matcher = compile_matcher(vocab.tokenizer, grammar)
    assert matcher.consume_tokens(spelled) and matcher.is_accepting()
    matcher = compile_matcher(vocab.tokenizer, grammar)
    assert not matcher.consume_tokens(vocab.tokens('<tool_call>\n{"name": "<tool_call>"'))


def test_json_strings_never_hold_special_tokens(vocab):
    matcher = compile_matcher(vocab.tokenizer, schema_grammar({"type": "string"}, param="p"))
    assert matcher.consume_tokens(vocab.tokens('"'))
    end_of_turn = vocab.tokens("<|im_end|>")
    assert len(end_of_turn) > 1 or not matcher.consume_tokens(end_of_turn)


def test_end_of_generation_is_allowed_exactly_when_the_grammar_is_complete(vocab):
    matcher = compile_matcher(vocab.tokenizer, schema_grammar({"enum": ["yes", "yesno"]}, param="p"))
    ends = vocab.tokenizer.eos_tokens
    for token in vocab.tokens('"yes'):
        assert not any(_allowed(matcher, end) for end in ends)
        assert matcher.consume_token(token)
    assert not any(_allowed(matcher, end) for end in ends)
    assert matcher.consume_tokens(vocab.tokens('"'))
    assert all(_allowed(matcher, end) for end in ends)


def _allowed(matcher, token: int) -> bool:
    mask = matcher.compute_bitmask()
    return bool(mask[token // 8] >> (token % 8) & 1)


def test_reasoning_comes_first_then_the_constrained_answer(vocab):
    grammar = after_reasoning(schema_grammar({"enum": [1, 2]}, param="p"))
    assert vocab.accepts(grammar, "Let me think: </thin k> is it 3 or <b>?</think>\n\n2")
    assert not vocab.accepts(grammar, "2")  # the block is closed first
    assert not vocab.accepts(grammar, "maybe</think>3")
