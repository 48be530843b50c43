"""Which dialect a chat template speaks, read from the real Qwen templates, and the dialect wired through the API.

The real templates come from the pinned llama-cpp-python sdist (vendor/llama.cpp/models/templates),
never from this repository: the `qwen_template` fixture (devtools/assets.py) fetches and caches them.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_server.api.app import create_app
from edge_server.api.schemas import ChatCompletionRequest
from edge_server.api.state import ServedModel
from edge_server.api.toolplan import plan_tools
from edge_server.devtools.fake_engine import FakeEngine
from edge_server.dialects import hermes, qwen_xml
from edge_server.dialects.dialect import all_dialects, detect_dialect
from edge_server.generation.prompt import CHATML_TEMPLATE
from edge_server.settings import Settings
from tests.unit.test_tool_call_extractor import summary

DIALECT_OF = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": "hermes",
    "Qwen-Qwen3-0.6B.jinja": "hermes",
    "Qwen-QwQ-32B.jinja": "hermes",
    "Qwen3-Coder.jinja": "qwen_xml",
    "Qwen3.5-4B.jinja": "qwen_xml",
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "where": {"type": "object"}, "tags": {"type": "array"}, "note": {"type": ["string", "null"]}}}}}
ARGUMENTS = {"city": "Paris\nTexas", "days": 3, "metric": True, "where": {"lat": 1.5, "lon": -2},
             "tags": ["a", "b c"], "note": None}


def test_every_dialect_module_is_found_and_hermes_is_the_fallback():
    names = [d.name for d in all_dialects()]
    assert {"qwen_xml", "hermes"} <= set(names) and names[-1] == "hermes"


@pytest.mark.parametrize("name", DIALECT_OF)
def test_real_templates_are_read_as_their_dialect(qwen_template, name):
    assert detect_dialect(qwen_template(name.removesuffix(".jinja"))).name == DIALECT_OF[name]


def test_detection_reads_the_text_not_a_name():
    assert detect_dialect(CHATML_TEMPLATE) is hermes.DIALECT
    assert detect_dialect("") is hermes.DIALECT
    assert detect_dialect("writes <function=f> only") is hermes.DIALECT
    assert detect_dialect("{{ '<function=' + name + '>' }}{{ '<parameter=' + p + '>' }}") is qwen_xml.DIALECT


@pytest.mark.parametrize("name", DIALECT_OF)
def test_calls_rendered_by_each_real_template_are_read_back(qwen_template, name):
    """A call the template writes into history is what the model learnt to write: it must parse back."""
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
             for i in range(2)]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_0", "content": "sunny"}, {"role": "user", "content": "Thanks"}]
    prompt = Jinja2ChatFormatter(qwen_template(name.removesuffix(".jinja")), eos_token="<|im_end|>", bos_token="")(
        messages=messages, tools=[WEATHER]).prompt
    rendered = prompt[prompt.index("<tool_call>", prompt.index("Weather?")) : prompt.rindex("</tool_call>") + 12]
    dialect = detect_dialect(qwen_template(name.removesuffix(".jinja")))
    extractor = dialect.extractor({"get_weather": WEATHER["function"]["parameters"]}, max_calls=None,
                                  incremental=True)
    content, found = summary(extractor.push(rendered) + extractor.finish())
    assert content == "" and [(i, n) for i, n, _ in found] == [(0, "get_weather"), (1, "get_weather")]
    assert all(json.loads(arguments) == ARGUMENTS for _, _, arguments in found)


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}],
                                                 "tools": [WEATHER], **fields})


@pytest.mark.parametrize("dialect", [hermes.DIALECT, qwen_xml.DIALECT])
def test_plan_uses_the_dialect_for_grammar_and_extraction(dialect):
    plan = plan_tools(request(tool_choice="required"), dialect)
    assert plan.dialect is dialect and plan.callable_names == {"get_weather"}
    assert ("<function=get_weather>" in plan.grammar) == (dialect is qwen_xml.DIALECT)
    assert type(plan.extractor(incremental=True)) is type(dialect.extractor({}, max_calls=None, incremental=True))
    auto = plan_tools(request(), dialect)
    assert auto.grammar is None and auto.extractor(incremental=False) is not None
    assert plan_tools(request(tool_choice="none"), dialect).extractor(incremental=True) is None


def test_plan_for_a_named_function_keeps_its_schema():
    plan = plan_tools(request(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
                      qwen_xml.DIALECT)
    assert plan.functions == {"get_weather": WEATHER["function"]["parameters"]} and plan.max_calls == 1


# A ChatML template that tells the model to answer in the XML form, as Qwen3-Coder's does.
XML_TEMPLATE = CHATML_TEMPLATE + (
    "{# calls: <tool_call>\n<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n</function>\n</tool_call> #}")
XML_PIECES = (b"Checking.\n<tool_", b"call>\n<function=get_", b"weather>\n<parameter=city>\nOslo\n</param",
              b"eter>\n<parameter=days>\n2\n</parameter>\n<parameter=metric>\nfalse\n</parameter>\n</function>\n",
              b"</tool_call>")


def xml_client(engine: FakeEngine):
    engine.info = dataclasses.replace(engine.info, chat_template=XML_TEMPLATE)
    served = ServedModel.of(engine, "fake-xml")
    assert served.dialect is qwen_xml.DIALECT
    return create_app(Settings(threads=1), served).test_client()


def test_xml_calls_come_back_typed_through_the_api():
    body = xml_client(FakeEngine(pieces=XML_PIECES)).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER]}).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo", "days": 2, "metric": False}


def test_xml_calls_stream_with_the_usual_deltas():
    response = xml_client(FakeEngine(pieces=XML_PIECES)).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER], "stream": True})
    chunks = [json.loads(line[6:]) for line in response.get_data(as_text=True).split("\n")
              if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    first = calls[0]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert [c["function"]["arguments"] for c in calls[1:]] == ['{"city": "Oslo"', ', "days": 2', ', "metric": false',
                                                               "}"]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_forced_call_hands_the_engine_the_xml_grammar():
    engine = FakeEngine(pieces=XML_PIECES)
    xml_client(engine).post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER], "tool_choice": "required"})
    [grammar] = engine.grammars
    assert '"<function=get_weather>\\n"' in grammar and '"<parameter=city>\\n"' in grammar
