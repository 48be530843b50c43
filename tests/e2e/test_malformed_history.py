"""Earlier tool calls handed back malformed, in each API's history form (chat `tool_calls`, Responses
`function_call` items, Messages `tool_use` blocks): a 400 naming the field, never a 500 or a silent render."""

from __future__ import annotations

import pytest
import requests

USER = {"role": "user", "content": "Weather?"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


def chat_history(function) -> list[dict]:
    call = {"id": "c1", "type": "function", "function": function}
    return [USER, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"}]


CHAT_CASES = {  # the assistant turn's malformed call -> the field named
    "function a string": ("x", "messages.1.tool_calls.0.function"),
    "function a number": (1.5, "messages.1.tool_calls.0.function"),
    "function null": (None, "messages.1.tool_calls.0.function"),
    "arguments a number": ({"name": "f", "arguments": 5}, "messages.1.tool_calls.0.function.arguments"),
    "arguments null": ({"name": "f", "arguments": None}, "messages.1.tool_calls.0.function.arguments"),
    "arguments missing": ({"name": "f"}, "messages.1.tool_calls.0.function.arguments"),
    "arguments a list": ({"name": "f", "arguments": [1]}, "messages.1.tool_calls.0.function.arguments"),
    "name a number": ({"name": 7, "arguments": "{}"}, "messages.1.tool_calls.0.function.name"),
    "name missing": ({"arguments": "{}"}, "messages.1.tool_calls.0.function.name"),
    "name empty": ({"name": "", "arguments": "{}"}, "messages.1.tool_calls.0.function.name"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", CHAT_CASES.values(), ids=CHAT_CASES.keys())
def test_a_malformed_chat_tool_call_in_the_history_is_a_400_naming_the_field(server, case, stream):
    function, param = case
    response = requests.post(server.base_url + "/v1/chat/completions", timeout=30, json={
        "messages": chat_history(function), "tools": [TOOL], "max_tokens": 2, "stream": stream})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_value", error
    assert param in error["message"] and "template" not in error["message"]


def test_a_malformed_legacy_function_call_in_the_history_is_a_400_naming_the_field(server):
    messages = [USER, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": 5}},
                {"role": "function", "name": "f", "content": "ok"}]
    response = requests.post(server.base_url + "/v1/chat/completions", timeout=30,
                             json={"messages": messages, "functions": [TOOL["function"]], "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.1.function_call.arguments"


def test_well_formed_history_calls_still_render_and_other_roles_calls_are_ignored(server):
    for function in ({"name": "f", "arguments": '{"a": 1}'}, {"name": "f", "arguments": {"a": 1}},
                     {"name": "f", "arguments": ""}):
        response = requests.post(server.base_url + "/v1/chat/completions", timeout=30, json={
            "messages": chat_history(function), "tools": [TOOL], "max_tokens": 2})
        assert response.status_code == 200, (function, response.text)
    stray = [{**USER, "tool_calls": [{"function": "x"}]}]  # only an assistant's calls are rendered (and checked)
    response = requests.post(server.base_url + "/v1/chat/completions", timeout=30,
                             json={"messages": stray, "max_tokens": 2})
    assert response.status_code == 200, response.text


RESPONSES_CASES = {  # the function_call item's fields -> the field named
    "name a number": ({"name": 7, "arguments": "{}"}, "input.1.name"),
    "name empty": ({"name": "", "arguments": "{}"}, "input.1.name"),
    "arguments a number": ({"name": "f", "arguments": 5}, "input.1.arguments"),
    "arguments an object": ({"name": "f", "arguments": {"a": 1}}, "input.1.arguments"),
    "arguments missing": ({"name": "f"}, "input.1.arguments"),
}


@pytest.mark.parametrize("case", RESPONSES_CASES.values(), ids=RESPONSES_CASES.keys())
def test_a_malformed_responses_function_call_item_is_a_400_naming_the_field(server, case):
    fields, param = case
    items = [{"role": "user", "content": "Weather?"}, {"type": "function_call", "call_id": "c1", **fields},
             {"type": "function_call_output", "call_id": "c1", "output": "ok"}]
    response = requests.post(server.base_url + "/v1/responses", timeout=30, json={
        "input": items, "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
        "max_output_tokens": 2})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.json()


MESSAGES_CASES = {  # the tool_use block's fields -> the field named (after the block's type)
    "name a number": ({"name": 7, "input": {}}, "name"),
    "name empty": ({"name": "", "input": {}}, "name"),
    "input a string": ({"name": "f", "input": "x"}, "input"),
    "input a number": ({"name": "f", "input": 5}, "input"),
    "input missing": ({"name": "f"}, "input"),
}


@pytest.mark.parametrize("case", MESSAGES_CASES.values(), ids=MESSAGES_CASES.keys())
def test_a_malformed_messages_tool_use_block_is_a_400_naming_the_field(server, case):
    fields, where = case
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", **fields}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}]
    response = requests.post(server.base_url + "/v1/messages", timeout=30, json={
        "model": "m", "max_tokens": 2, "messages": messages,
        "tools": [{"name": "f", "input_schema": {"type": "object"}}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert f"'messages.1.content.0.tool_use.{where}'" in error["message"], error
