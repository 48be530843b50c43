"""POST /v1/responses in-process on the fake engine: translation into a chat request, the response object,
the stream's event sequence, and the 400s (the real SDKs through the real server: tests/e2e/test_responses_api.py)."""

from __future__ import annotations

import json

import pytest

from edge_server.api.app import create_app
from edge_server.api.responses_api import chat_messages
from edge_server.api.responses_schemas import ResponsesRequest
from edge_server.api.state import ServedModel
from edge_server.devtools.fake_engine import FakeEngine
from edge_server.devtools.synthetic import CHAT_TEMPLATE
from edge_server.engine.types import FinishReason
from edge_server.settings import Settings

CALL_PIECES = (b"<tool_", b'call>\n{"name": "f", ', b'"arguments": {"a": 1}}\n</tool_call>')
TOOL = {"type": "function", "name": "f", "description": "F", "parameters": {"type": "object"}}


def client_for(engine: FakeEngine):
    return create_app(Settings(threads=1), ServedModel.of(engine, "fake-model")).test_client()


def respond(client, **fields):
    return client.post("/v1/responses", json={"input": "Hi", **fields})


def named_events(response) -> list[tuple[str, dict]]:
    """(event name, data) of every event; each name must equal its data's `type`."""
    events = []
    for block in response.get_data(as_text=True).split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if lines:
            data = json.loads(lines["data"])
            assert lines["event"] == data["type"]
            events.append((lines["event"], data))
    return events


def test_a_string_input_answers_with_a_message_and_usage():
    engine = FakeEngine()
    response = respond(client_for(engine), instructions="Be brief.", metadata={"k": "v"}, max_output_tokens=50)
    assert response.status_code == 200
    body = response.get_json()
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["status"] == "completed"
    [message] = body["output"]
    assert message["type"] == "message" and message["id"].startswith("msg_") and message["status"] == "completed"
    assert message["content"] == [{"type": "output_text", "text": "Hello, world!", "annotations": [], "logprobs": []}]
    prompt = len(engine.jobs[0].prompt)
    assert body["usage"] == {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + 4}
    assert (body["instructions"], body["metadata"], body["max_output_tokens"]) == ("Be brief.", {"k": "v"}, 50)
    assert (body["store"], body["previous_response_id"], body["error"], body["incomplete_details"]) \
        == (False, None, None, None)
    assert body["text"] == {"format": {"type": "text"}} and body["tool_choice"] == "none" and body["tools"] == []


def test_max_output_tokens_makes_an_incomplete_response():
    body = respond(client_for(FakeEngine()), max_output_tokens=2).get_json()
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete" and body["output"][0]["content"][0]["text"] == "Hello,"


def test_a_tool_call_becomes_a_function_call_item_and_tools_are_echoed():
    body = respond(client_for(FakeEngine(pieces=CALL_PIECES)), tools=[TOOL]).get_json()
    [call] = body["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert (call["name"], json.loads(call["arguments"]), call["status"]) == ("f", {"a": 1}, "completed")
    assert body["tools"] == [{**TOOL, "strict": None}] and body["tool_choice"] == "auto"


NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents", "tools": [{**TOOL, "name": "spawn"}]}
NAMESPACED_CALL = (b'<tool_call>\n{"name": "multi_agent_v1__spawn", "arguments": {"a": 1}}\n</tool_call>',)


@pytest.mark.parametrize("stream", [False, True])
def test_namespace_functions_are_offered_flat_and_called_back_by_namespace_and_name(stream):
    engine = FakeEngine(pieces=NAMESPACED_CALL, chat_template=CHAT_TEMPLATE, n_ctx=4096)
    response = respond(client_for(engine), tools=[TOOL, NAMESPACE, {"type": "web_search"}], stream=stream)
    prompt = bytes(engine.jobs[0].prompt).decode()
    assert '"name": "multi_agent_v1__spawn"' in prompt and '"name": "f"' in prompt and "web_search" not in prompt
    if stream:
        events = named_events(response)
        call = next(data["item"] for name, data in events if name == "response.output_item.done")
        final = events[-1][1]["response"]
    else:
        final = response.get_json()
        call = final["output"][0]
    assert (call["type"], call["name"], call["namespace"]) == ("function_call", "spawn", "multi_agent_v1")
    assert final["tools"][1] == {**NAMESPACE, "tools": [{**TOOL, "name": "spawn", "strict": None}]}
    assert final["tools"][2] == {"type": "web_search"}


def test_a_namespaced_call_handed_back_renders_by_its_flat_name_and_plain_calls_have_no_namespace():
    engine = FakeEngine(chat_template=CHAT_TEMPLATE, n_ctx=4096)
    history = [{"role": "user", "content": "Spawn one."},
               {"type": "function_call", "call_id": "c1", "name": "spawn", "namespace": "multi_agent_v1",
                "arguments": "{}"},
               {"type": "function_call_output", "call_id": "c1", "output": "spawned"}]
    assert respond(client_for(engine), input=history, tools=[NAMESPACE]).status_code == 200
    assert '"name": "multi_agent_v1__spawn", "arguments": {}' in bytes(engine.jobs[0].prompt).decode()
    plain = respond(client_for(FakeEngine(pieces=CALL_PIECES)), tools=[TOOL]).get_json()["output"][0]
    assert "namespace" not in plain


def test_a_function_of_a_namespace_may_be_chosen_by_its_name():
    engine = FakeEngine(pieces=NAMESPACED_CALL, chat_template=CHAT_TEMPLATE, n_ctx=4096)
    body = respond(client_for(engine), tools=[NAMESPACE], tool_choice={"type": "function", "name": "spawn"}).get_json()
    assert (body["output"][0]["name"], body["output"][0]["namespace"]) == ("spawn", "multi_agent_v1")
    assert 'multi_agent_v1__spawn' in engine.grammars[0]


def test_hosted_tools_are_left_out_with_a_warning_naming_them(caplog):
    engine = FakeEngine()
    response = respond(client_for(engine), tools=[{"type": "file_search", "vector_store_ids": []}, TOOL,
                                                  {"type": "custom", "name": "apply_patch"}])
    assert response.status_code == 200
    assert "left out tools that do not run on this server: tools.0 (file_search), tools.2 (custom)" in caplog.text


def test_stream_sends_the_documented_sequence_and_the_text_of_the_final_response():
    response = respond(client_for(FakeEngine()), stream=True)
    assert response.mimetype == "text/event-stream"
    events = named_events(response)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    names = [name for name, _ in events]
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output"] == []
    final = events[-1][1]["response"]
    assert "".join(deltas) == final["output"][0]["content"][0]["text"] == "Hello, world!"
    assert final["usage"]["output_tokens"] == 4
    assert events[-2][1]["item"] == final["output"][0]


def test_streamed_function_call_arguments():
    events = named_events(respond(client_for(FakeEngine(pieces=CALL_PIECES)), tools=[TOOL], stream=True))
    names = [name for name, _ in events]
    assert names[2] == "response.output_item.added" and events[2][1]["item"]["type"] == "function_call"
    arguments = "".join(data["delta"] for name, data in events if name == "response.function_call_arguments.delta")
    done = next(data for name, data in events if name == "response.function_call_arguments.done")
    assert json.loads(arguments) == {"a": 1} and done["arguments"] == arguments and done["name"] == "f"
    assert names[-2:] == ["response.output_item.done", "response.completed"]


def test_a_failed_generation_ends_the_stream_with_response_failed():
    events = named_events(respond(client_for(FakeEngine(finish=FinishReason.ERROR)), stream=True))
    assert events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["status"] == "failed"
    assert events[-1][1]["response"]["error"] == {"code": "generation_failed", "message": "scripted failure"}
    assert events[-2][0] == "response.output_item.done" and events[-2][1]["item"]["status"] == "incomplete"
    whole = respond(client_for(FakeEngine(finish=FinishReason.ERROR)))
    assert whole.status_code == 500 and whole.get_json()["error"]["message"] == "scripted failure"


def test_items_translate_into_chat_messages():
    request = ResponsesRequest.model_validate({"instructions": "Sys", "input": [
        {"role": "developer", "content": "Dev"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text",
                                                                                            "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "sum"}],
         "content": [{"type": "reasoning_text", "text": "think"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me see."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "two"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "only a summary"}]},
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
    ]})
    assert chat_messages(request) == [
        {"role": "system", "content": "Sys"},
        {"role": "developer", "content": "Dev"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "Let me see.", "reasoning_content": "think", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": None, "reasoning_content": "only a summary", "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]


def test_settings_reach_the_engine():
    engine = FakeEngine(pieces=(b"{}",))
    body = respond(client_for(engine), temperature=0, top_p=0.5, max_output_tokens=7, text={"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": False}}).get_json()
    job = engine.jobs[0]
    assert (job.sampling.temperature, job.sampling.top_p, job.max_tokens) == (0, 0.5, 7)
    assert job.sampling.grammar is not None
    assert body["text"] == {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"},
                                       "strict": False}}


ABSENT = object()
BAD = {
    "no input": ({"input": ABSENT}, "input"),
    "empty item list": ({"input": []}, "input"),
    "only reasoning": ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    "input a number": ({"input": 5}, "input"),
    "unknown item type": ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0"),
    "item without type or role": ({"input": [{"content": "x"}]}, "input.0"),
    "image for a model without a projector": (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        "input[0].content[0].image_url"),
    "image by file_id": ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
                         "input[0].content[0].file_id"),
    "image in a system message": ({"input": [{"role": "system", "content": [{"type": "input_image",
                                                                            "image_url": "x"}]}]},
                                  "input[0].content[0]"),
    "image part of an unknown type": ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
                                      "input.0.content.0.type"),
    "unknown role": ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    "function call without name": ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]},
                                   "input.0.name"),
    "hosted tool chosen": ({"tools": [TOOL, {"type": "web_search"}], "tool_choice": {"type": "web_search"}},
                           "tool_choice"),
    "tool without type": ({"tools": [{"name": "f"}]}, "tools.0.type"),
    "chat-shaped tool": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools.0.name"),
    "bad tool name": ({"tools": [{**TOOL, "name": "a b"}]}, "tools.0.name"),
    "tool choice of an unknown tool": ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "g"}},
                                       "tool_choice"),
    "required without tools": ({"tool_choice": "required"}, "tool_choice"),
    "hosted tool choice": ({"tools": [TOOL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    "json_schema without schema": ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    "unknown format": ({"text": {"format": {"type": "yaml"}}}, "text.format.type"),
    "unknown effort": ({"reasoning": {"effort": "max"}}, "reasoning.effort"),
    "temperature 3": ({"temperature": 3}, "temperature"),
    "zero output tokens": ({"max_output_tokens": 0}, "max_output_tokens"),
    "metadata not strings": ({"metadata": {"a": 1}}, "metadata.a"),
    "schema not enforceable": ({"text": {"format": {"type": "json_schema", "name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}},
                                 "text.format.schema"),
}


@pytest.mark.parametrize("fields, param", BAD.values(), ids=BAD.keys())
def test_bad_requests_are_400s_naming_the_field(fields, param):
    body = {key: value for key, value in {"input": "Hi", **fields}.items() if value is not ABSENT}
    response = client_for(FakeEngine()).post("/v1/responses", json=body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("field, value", [("previous_response_id", "resp_1"), ("conversation", "conv_1"),
                                          ("prompt", {"id": "p"}), ("background", True)])
def test_stateful_parameters_are_unsupported(field, value):
    error = respond(client_for(FakeEngine()), **{field: value}).get_json()["error"]
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")
    assert "not supported" in error["message"]


def test_stateless_parameters_given_as_null_or_false_are_accepted():
    response = respond(client_for(FakeEngine()), previous_response_id=None, background=False, store=True,
                       include=["reasoning.encrypted_content"], truncation="auto", text={"verbosity": "low"})
    assert response.status_code == 200, response.get_json()


# ---- the OpenAPI document and the server agree ------------------------------------------------------

VALID = {
    "string": {"input": "Hi"},
    "everything": {"model": "m", "input": [{"role": "user", "content": "Hi"}], "instructions": "Be brief.",
                   "tools": [TOOL], "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False,
                   "text": {"format": {"type": "json_object"}, "verbosity": "low"}, "reasoning": {"effort": "none"},
                   "max_output_tokens": 5, "temperature": 0, "top_p": 1, "stream": True, "store": False,
                   "metadata": {"a": "b"}, "user": "u", "previous_response_id": None, "background": False},
    "items": {"input": [
        {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "id": "fc_1", "status": "completed"},
        {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "x"}]}]},
    "json schema": {"input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}}},
    "hosted tool": {"input": "x", "tools": [{"type": "web_search", "external_web_access": False}]},
    "namespace": {"input": "x", "tools": [{"type": "namespace", "name": "ns", "description": "N", "tools": [TOOL]}],
                  "tool_choice": {"type": "function", "name": "f"}},
}
INVALID = {
    "empty list": {"input": []},
    "unknown item": {"input": [{"type": "item_reference", "id": "x"}]},
    "hosted tool chosen": {"input": "x", "tools": [{"type": "web_search"}], "tool_choice": {"type": "web_search"}},
    "namespace without tools": {"input": "x", "tools": [{"type": "namespace", "name": "ns"}]},
    "required without tools": {"input": "x", "tool_choice": "required"},
    "json schema without schema": {"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
    "previous response": {"input": "x", "previous_response_id": "resp_1"},
    "background": {"input": "x", "background": True},
}


@pytest.fixture(scope="module")
def document():
    return create_app(Settings(threads=1)).test_client().get("/openapi.json").get_json()


@pytest.mark.parametrize("body, valid", [*((b, True) for b in VALID.values()), *((b, False) for b in INVALID.values())],
                         ids=[*VALID, *INVALID])
def test_the_document_accepts_what_the_server_accepts(document, body, valid):
    from tests.unit.test_openapi import schema_validator

    response = create_app(Settings(threads=1)).test_client().post("/v1/responses", json=body)
    assert response.status_code == (503 if valid else 400), response.get_json()  # 503: no model loaded
    assert schema_validator(document, "ResponsesRequest").is_valid(body) is valid


def test_answers_and_stream_events_match_the_document(document):
    from tests.unit.test_openapi import check_response, schema_validator

    for pieces, fields in (((b"Hi",), {}), (CALL_PIECES, {"tools": [TOOL]}), ((b"Hi",), {"max_output_tokens": 1})):
        client = client_for(FakeEngine(pieces=pieces))
        whole = respond(client, **fields)
        check_response(document, "/v1/responses", "post", 200, whole.content_type, whole.headers, whole.get_json())
        stream = respond(client, stream=True, **fields)
        event_schema = document["paths"]["/v1/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]
        for name, data in named_events(stream):
            assert schema_validator(document, event_schema["schema"]).is_valid({"event": name, "data": json.dumps(data)})
            if "response" in data:
                assert schema_validator(document, "ResponseObject").is_valid(data["response"]), data
    for example in document["paths"]["/v1/responses"]["post"]["requestBody"]["content"]["application/json"][
            "examples"].values():
        assert schema_validator(document, "ResponsesRequest").is_valid(example["value"]), example


def test_the_api_key_guards_the_route():
    client = create_app(Settings(threads=1, api_key="k"), ServedModel.of(FakeEngine(), "fake-model")).test_client()
    assert client.post("/v1/responses", json={"input": "Hi"}).status_code == 401
    answered = client.post("/v1/responses", json={"input": "Hi"}, headers={"Authorization": "Bearer k"})
    assert answered.status_code == 200 and answered.get_json()["output"][0]["content"][0]["text"] == "Hello, world!"
