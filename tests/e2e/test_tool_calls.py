"""Function calling and structured output through the real server, streamed and not."""

from __future__ import annotations

import json

import pytest
import requests
from openai import OpenAI

from edge_server.devtools.synthetic import write_scripted_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "parameters": {"type": "object", "properties": {"on": {"type": "boolean"},
                                                                         "level": {"enum": [1, 2, 3]}},
                                        "required": ["on", "level"], "additionalProperties": False}}}
TOOLS = [WEATHER, ALARM]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# The text the scripted model writes: prose, then a Qwen tool-call block, tags made of ordinary tokens.
TOOL_SCRIPT = [b"Let me check.", b"\n<tool_", b"call>", b'\n{"name": ', b'"get_weather"', b', "arguments": ',
               b'{"city": ', b'"Oslo", ', b'"unit": "c"}}', b"\n</tool", b"_call>"]


@pytest.fixture(scope="module")
def client(base_url) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tool_server(start_server, tmp_path_factory):
    model = write_scripted_model(tmp_path_factory.mktemp("models") / "tool-caller.gguf", TOOL_SCRIPT)
    return start_server("--model", str(model))


@pytest.fixture(scope="module")
def tool_client(tool_server) -> OpenAI:
    return OpenAI(base_url=tool_server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def valid_arguments(name: str, arguments: str) -> dict:
    parsed = json.loads(arguments)
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    assert set(parsed) == set(schema["required"])
    for key, value in parsed.items():
        spec = schema["properties"][key]
        assert value in spec["enum"] if "enum" in spec else isinstance(value, bool)
    return parsed


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "set_alarm"}),
    ({"type": "function", "function": {"name": "set_alarm"}}, {"set_alarm"}),
])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_forced_choice_gives_a_valid_call_streamed_and_not(client, tool_choice, names, seed):
    options = dict(model="m", messages=ASK, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False,
                   temperature=0.8, seed=seed, max_tokens=200)
    answer = client.chat.completions.create(**options)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name in names
    valid_arguments(call.function.name, call.function.arguments)
    with client.chat.completions.stream(**options) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)


def test_required_with_parallel_calls_gives_one_or_more_valid_calls(client):
    answer = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                            temperature=0, max_tokens=400)
    calls = answer.choices[0].message.tool_calls
    assert calls and answer.choices[0].finish_reason in ("tool_calls", "length")
    for call in calls[:-1] if answer.choices[0].finish_reason == "length" else calls:
        valid_arguments(call.function.name, call.function.arguments)


def test_streamed_call_deltas_carry_id_and_name_once_then_only_argument_fragments(base_url):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    call_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert call_deltas[0] == {"index": 0, "id": call_deltas[0]["id"], "type": "function",
                              "function": {"name": "get_weather", "arguments": ""}}
    assert len(call_deltas) > 2
    for later in call_deltas[1:]:
        assert set(later) == {"index", "function"} and set(later["function"]) == {"arguments"}
    valid_arguments("get_weather", "".join(d["function"]["arguments"] for d in call_deltas))
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]] \
        == ["tool_calls"]
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_legacy_named_function_call_streamed_and_not(client, base_url):
    functions = [WEATHER["function"], ALARM["function"]]
    answer = client.chat.completions.create(model="m", messages=ASK, functions=functions,
                                            function_call={"name": "get_weather"}, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    valid_arguments("get_weather", choice.message.function_call.arguments)
    chunks = list(client.chat.completions.create(model="m", messages=ASK, functions=functions,
                                                 function_call={"name": "get_weather"}, temperature=0, stream=True))
    pieces = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert pieces[0].name == "get_weather" and all(p.name is None for p in pieces[1:])
    assert "".join(p.arguments for p in pieces) == choice.message.function_call.arguments


def test_auto_choice_turns_the_models_block_into_a_call(tool_client):
    answer = tool_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo", "unit": "c"})


def test_auto_choice_streamed_never_leaks_a_partial_tag(tool_client):
    chunks = list(tool_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=0,
                                                      stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me check."
    with tool_client.chat.completions.stream(model="m", messages=ASK, tools=TOOLS, temperature=0) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Oslo"


def test_without_tools_the_block_is_plain_content(tool_client):
    answer = tool_client.chat.completions.create(model="m", messages=ASK, temperature=0)
    assert answer.choices[0].message.content == b"".join(TOOL_SCRIPT).decode()
    assert answer.choices[0].finish_reason == "stop"


def test_tool_choice_none_gives_text(tool_client):
    answer = tool_client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none",
                                                 temperature=0)
    assert answer.choices[0].message.tool_calls is None
    assert "<tool_call>" in answer.choices[0].message.content


def test_conversation_with_a_tool_result_is_answered(client, base_url):
    first = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    answer = client.chat.completions.create(model="m", messages=history, tools=TOOLS, max_tokens=20, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # How the history is rendered (arguments as objects, grouped results) is checked in tests/unit/test_prompt.py.
    assert answer.usage.completion_tokens > 0


@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_output_parses_and_matches(client, strict):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "l"]}},
              "required": ["ok", "size"], "additionalProperties": False}
    for seed in (1, 2, 3):
        answer = client.chat.completions.create(
            model="m", messages=ASK, temperature=1.0, seed=seed, max_tokens=100,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": strict}})
        data = json.loads(answer.choices[0].message.content)
        assert set(data) == {"ok", "size"} and isinstance(data["ok"], bool) and data["size"] in "sml"


def test_json_object_output_starts_an_object(client):
    answer = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=30,
                                            response_format={"type": "json_object"})
    assert answer.choices[0].message.content.lstrip().startswith("{")


BAD_TOOL_REQUESTS = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools.0.function"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"functions": [WEATHER["function"]], "function_call": {"name": "nope"}}, "function_call"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}}}}], "tool_choice": "required"},
     "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}}, "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("fields, param", BAD_TOOL_REQUESTS)
def test_bad_tool_request_is_a_400_naming_the_field(base_url, fields, param):
    response = requests.post(base_url + "/v1/chat/completions", json={"messages": ASK, **fields}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# ---- the legacy `grammar` field (llama.cpp's GBNF), read by llguidance -----------------------------------------

YES_NO = 'root ::= answer\nanswer ::= "yes" | "no"  # a comment'
TICKET = 'root ::= [A-Z]{2} "-" digit digit digit (" " tag)?\ndigit ::= [0-9]\ntag ::= "urgent" | "later"'


@pytest.mark.parametrize("stream", [False, True])
def test_gbnf_grammar_forces_chat_and_completion_output(base_url, client, stream):
    """Every choice (n=2, sampled hot) matches the GBNF exactly and ends by itself when the grammar is complete."""
    import re
    for grammar, language in ((YES_NO, r"yes|no"), (TICKET, r"[A-Z]{2}-[0-9]{3}( urgent| later)?")):
        answer = client.chat.completions.create(model="m", messages=ASK, temperature=1.5, seed=4, n=2, max_tokens=40,
                                                stream=stream, extra_body={"grammar": grammar})
        chunks = list(answer) if stream else None
        for index in range(2):
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == index][-1]
            else:
                text, finish = answer.choices[index].message.content, answer.choices[index].finish_reason
            assert re.fullmatch(language, text) and finish == "stop", (grammar, text, finish)
    completion = client.completions.create(model="m", prompt="Ticket:", temperature=1.5, seed=4, n=2, max_tokens=40,
                                           extra_body={"grammar": TICKET})
    for choice in completion.choices:
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}( urgent| later)?", choice.text) and choice.finish_reason == "stop"


BAD_GRAMMARS = [
    ({"grammar": 'root ::= "a" missing'}, "Rule 'missing' not found"),
    ({"grammar": 'root ::= [a-'}, "Unexpected end of input"),
    ({"grammar": 'start: "a"'}, "Expected ::="),  # Lark is not GBNF
    ({"grammar": 'answer ::= "a"'}, "No 'root' rule"),
    ({"grammar": 'root ::= edge-think\nedge-think ::= "x"'}, "reserved"),
    ({"grammar": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000}, "nests too deeply"),
    ({"grammar": 'root ::= "a"' + " " * 70_000}, "65536"),
    ({"grammar": YES_NO, "response_format": {"type": "json_object"}}, "not both"),
    ({"grammar": YES_NO, "tools": TOOLS}, "tools"),
    ({"grammar": YES_NO, "tools": TOOLS, "tool_choice": "required"}, "tools"),
]


@pytest.mark.parametrize("fields, message", BAD_GRAMMARS, ids=[m for _, m in BAD_GRAMMARS])
def test_gbnf_grammar_llguidance_cannot_use_is_a_400_naming_grammar(base_url, fields, message):
    for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "Hi"})):
        if path == "/v1/completions" and set(fields) != {"grammar"}:
            continue
        response = requests.post(base_url + path, json={**body, **fields}, timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "grammar" and message in error["message"], error


def test_gbnf_grammar_with_tools_not_callable_is_served(client):
    """tool_choice none lists the tools in the prompt but calls nothing: the grammar shapes the whole answer."""
    answer = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", temperature=1.0,
                                            seed=3, max_tokens=10, extra_body={"grammar": YES_NO})
    assert answer.choices[0].message.content in ("yes", "no") and not answer.choices[0].message.tool_calls
