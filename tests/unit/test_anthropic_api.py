"""The Anthropic Messages API in-process on the fake engine: request -> chat translation, the streamed
block sequence, every error in Anthropic's shape, and the OpenAPI document of the two routes.

The SDK, real templates and the HTTP server are in tests/e2e/test_anthropic_api.py."""

from __future__ import annotations

import json

import pytest

from edge_server.api.anthropic_api import _Blocks, chat_request
from edge_server.api.anthropic_schemas import CountTokensRequest, MessagesRequest
from edge_server.api.app import create_app
from edge_server.api.state import ServedModel
from edge_server.devtools.fake_engine import FakeEngine
from edge_server.dialects.calls import ContentDelta, ToolCallArguments, ToolCallStart
from edge_server.engine.types import ENGINE_STOPPED, FinishReason
from edge_server.generation.reasoning import ReasoningDelta
from edge_server.settings import Settings
from tests.unit.test_openapi import check_response, schema_validator

USER = [{"role": "user", "content": "Hi"}]
MINIMAL = {"model": "m", "max_tokens": 16, "messages": USER}
TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def client_for(engine: FakeEngine | None = None, **settings):
    served = ServedModel.of(engine, "fake-model") if engine is not None else None
    return create_app(Settings(threads=1, **settings), served).test_client()


def named_events(response) -> list[tuple[str, dict]]:
    lines = response.get_data(as_text=True).split("\n")
    names = [line[7:] for line in lines if line.startswith("event: ")]
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert len(names) == len(data)
    return list(zip(names, data))


def assert_anthropic_error(response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}
    return body


# ---- translation ------------------------------------------------------------------------------------

def test_a_whole_conversation_translates_to_chat_messages():
    request = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 9, "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Call it.", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "down"}],
                 "is_error": True},
                {"type": "text", "text": "Thanks"}]}],
        "tools": [TOOL], "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "thinking": {"type": "disabled"}, "stop_sequences": ["END"], "temperature": 0.5, "top_k": 3,
        "metadata": {"user_id": "u"}, "stream": True})
    chat = chat_request(request)
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [
        {"role": "system", "content": "Be brief.\n\nBe kind."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Call it.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "21 C", "tool_call_id": "toolu_1"},
        {"role": "tool", "content": "Error: down", "tool_call_id": "toolu_2"},
        {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
    ]
    assert chat.tool_choice == "required" and chat.parallel_tool_calls is False
    assert chat.tools[0].function.parameters == TOOL["input_schema"]
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    assert (chat.max_tokens, chat.stop, chat.temperature, chat.top_k, chat.stream) == (9, ["END"], 0.5, 3, True)


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}),
])
def test_tool_choice_maps_onto_chat(choice, expected):
    chat = chat_request(CountTokensRequest.model_validate({**MINIMAL, "tools": [TOOL], "tool_choice": choice}))
    dumped = chat.tool_choice if isinstance(chat.tool_choice, str) else chat.tool_choice.model_dump()
    assert dumped == expected and chat.parallel_tool_calls is True


def test_thinking_enabled_and_unset():
    enabled = chat_request(CountTokensRequest.model_validate({**MINIMAL, "thinking": {"type": "enabled",
                                                                                         "budget_tokens": 2048}}))
    assert enabled.chat_template_kwargs == {"enable_thinking": True}
    assert chat_request(CountTokensRequest.model_validate(MINIMAL)).chat_template_kwargs is None


# ---- the streamed block sequence --------------------------------------------------------------------

def test_blocks_open_and_close_as_the_kind_changes_and_blank_text_before_a_call_is_dropped():
    blocks = _Blocks()
    sent = []
    for event in (ReasoningDelta("Hmm"), ReasoningDelta("."), ContentDelta("\n\n"), ToolCallStart(0, "call_ab", "f"),
                  ToolCallArguments(0, '{"a"'), ToolCallArguments(0, ": 1}"), ToolCallStart(1, "call_cd", "g"),
                  ContentDelta(" "), ContentDelta("Done")):
        sent += list(blocks.add(event))
    sent += list(blocks.close())
    events = [(chunk.split(b"\n")[0].decode()[7:], json.loads(chunk.split(b"\n")[1][6:])) for chunk in sent]
    summary = [(name, data["index"], data.get("content_block", data.get("delta", {})).get("type")) for name, data in events]
    assert summary == [
        ("content_block_start", 0, "thinking"), ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "thinking_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"), ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_stop", 2, None),
        ("content_block_start", 3, "text"), ("content_block_delta", 3, "text_delta"), ("content_block_stop", 3, None),
    ]
    assert events[4][1]["content_block"] == {"type": "tool_use", "id": "toolu_ab", "name": "f", "input": {}}
    assert events[11][1]["delta"]["text"] == " Done"


# ---- answers and errors -------------------------------------------------------------------------------

def test_whole_and_streamed_answers():
    client = client_for(FakeEngine())
    body = client.post("/v1/messages", json=MINIMAL).get_json()
    assert body["content"] == [{"type": "text", "text": "Hello, world!"}]
    assert body["stop_reason"] == "end_turn" and body["usage"]["output_tokens"] == 4
    events = named_events(client.post("/v1/messages", json={**MINIMAL, "stream": True}))
    assert [name for name, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in events)
    length = client.post("/v1/messages", json={**MINIMAL, "max_tokens": 2}).get_json()
    assert length["stop_reason"] == "max_tokens" and length["content"][0]["text"] == "Hello,"


def test_a_generation_that_fails_is_an_error_whole_and_an_error_event_streamed():
    client = client_for(FakeEngine(finish=FinishReason.ERROR))
    assert_anthropic_error(client.post("/v1/messages", json=MINIMAL), 500, "api_error")
    events = named_events(client.post("/v1/messages", json={**MINIMAL, "stream": True}))
    assert events[0][0] == "message_start" and events[-1][0] == "error"
    assert events[-1][1]["error"]["type"] == "api_error" and "message_stop" not in [name for name, _ in events]
    stopped = client_for(FakeEngine(finish=FinishReason.ERROR, error_code=ENGINE_STOPPED))
    assert_anthropic_error(stopped.post("/v1/messages", json=MINIMAL), 503, "overloaded_error")


def test_every_error_of_the_routes_is_in_anthropics_shape():
    keyed = client_for(FakeEngine(), api_key="k")
    refused = assert_anthropic_error(keyed.post("/v1/messages", json=MINIMAL), 401, "authentication_error")
    assert "x-api-key" in refused["error"]["message"]
    assert keyed.post("/v1/messages", json=MINIMAL, headers={"x-api-key": "k"}).status_code == 200
    assert keyed.post("/v1/messages", json=MINIMAL, headers={"Authorization": "Bearer k"}).status_code == 200
    assert keyed.get("/v1/models", headers={"X-Api-Key": "k"}).status_code == 200
    assert keyed.get("/v1/models", headers={"X-Api-Key": "wrong"}).get_json()["error"]["code"] == "invalid_api_key"

    client = client_for(FakeEngine(), max_body_bytes=1024)
    assert_anthropic_error(client.post("/v1/messages", data=b"x" * 2048, content_type="application/json"),
                           413, "request_too_large")
    assert_anthropic_error(client.post("/v1/messages", data=b"{", content_type="application/json"),
                           400, "invalid_request_error")
    assert_anthropic_error(client.get("/v1/messages/count_tokens"), 405, "invalid_request_error")
    assert_anthropic_error(client.post("/v1/messages/other", json={}), 404, "not_found_error")
    busy = client_for(FakeEngine(queue_full=True)).post("/v1/messages", json=MINIMAL)
    assert_anthropic_error(busy, 429, "rate_limit_error")
    assert busy.headers["Retry-After"] == "1"
    loading = client_for().post("/v1/messages/count_tokens", json=MINIMAL)
    assert_anthropic_error(loading, 503, "overloaded_error")
    assert "Retry-After" in loading.headers
    # Other routes keep the OpenAI envelope.
    assert client.post("/v1/chat/completions", data=b"{", content_type="application/json").get_json()["error"]["code"] \
        == "invalid_json"


def test_count_tokens_counts_the_rendered_prompt_without_generating():
    engine = FakeEngine()
    client = client_for(engine)
    counted = client.post("/v1/messages/count_tokens", json={**MINIMAL, "tools": [TOOL]}).get_json()
    assert engine.jobs == []
    client.post("/v1/messages", json={**MINIMAL, "tools": [TOOL]})
    assert counted == {"input_tokens": len(engine.jobs[0].prompt)}


# ---- the OpenAPI document ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def document():
    return client_for().get("/openapi.json").get_json()


def test_the_routes_document_anthropics_error_envelope_and_event_stream(document):
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        responses = document["paths"][path]["post"]["responses"]
        for status in ("400", "401", "404", "413", "500", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/AnthropicErrorResponse"}, (path, status)
    ok = document["paths"]["/v1/messages"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/Message"}
    event = schema_validator(document, ok["text/event-stream"]["schema"])
    assert event.is_valid({"event": "message_stop", "data": '{"type":"message_stop"}'})
    assert not event.is_valid({"event": "message", "data": "[DONE]"})
    client = client_for(FakeEngine())
    for path, body in (("/v1/messages", MINIMAL), ("/v1/messages/count_tokens", MINIMAL),
                       ("/v1/messages", {"messages": []})):
        response = client.post(path, json=body)
        check_response(document, path, "post", response.status_code, response.content_type, response.headers,
                       response.get_json())
    for _, data in named_events(client.post("/v1/messages", json={**MINIMAL, "stream": True})):
        if data["type"] == "message_start":
            assert schema_validator(document, "Message").is_valid(data["message"])


VALID = {
    "minimal": MINIMAL,
    "blocks and history": {**MINIMAL, "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
                           "messages": [*USER, {"role": "assistant", "content": [
                               {"type": "redacted_thinking", "data": "x"},
                               {"type": "tool_use", "id": "t", "name": "get_weather", "input": {}}]},
                               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
    "tools and choice": {**MINIMAL, "tools": [{**TOOL, "type": "custom"}], "tool_choice": {"type": "tool",
                                                                                          "name": "get_weather"}},
    "sampling": {**MINIMAL, "temperature": 1, "top_p": 0.5, "top_k": 0, "stop_sequences": ["a"], "metadata": {}},
    "thinking": {**MINIMAL, "thinking": {"type": "enabled", "budget_tokens": 1024}},
    "whole-number float": {**MINIMAL, "max_tokens": 16.0},
    "unknown field": {**MINIMAL, "service_tier": "auto"},
}
INVALID = {
    "no model": {"max_tokens": 1, "messages": USER},
    "no max_tokens": {"model": "m", "messages": USER},
    "empty messages": {**MINIMAL, "messages": []},
    "image": {**MINIMAL, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    "image in a tool result": {**MINIMAL, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]}]},
    "server tool": {**MINIMAL, "tools": [{"type": "bash_20250124", "name": "bash"}]},
    "named choice without a name": {**MINIMAL, "tools": [TOOL], "tool_choice": {"type": "tool"}},
    "bad tool name": {**MINIMAL, "tools": [{**TOOL, "name": "a b"}]},
    "seventeen stops": {**MINIMAL, "stop_sequences": ["s"] * 17},
    "top_p zero": {**MINIMAL, "top_p": 0},
    "stream string": {**MINIMAL, "stream": "yes"},
}
# The server's checks the document cannot state.
UNDOCUMENTABLE = {
    "thinking in a user turn": {**MINIMAL, "messages": [{"role": "user", "content": [
        {"type": "thinking", "thinking": "x"}]}]},
    "prefill": {**MINIMAL, "messages": [*USER, {"role": "assistant", "content": "So"}]},
    "unknown tool named": {**MINIMAL, "tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"}},
}


def _verdicts(document, body) -> tuple[bool, bool]:
    response = client_for().post("/v1/messages", json=body)
    assert response.status_code in (400, 503), response.get_json()  # without a model: 503 after validation
    return schema_validator(document, "MessagesRequest").is_valid(body), response.status_code != 400


@pytest.mark.parametrize("body", VALID.values(), ids=VALID.keys())
def test_valid_bodies_pass_the_document_and_the_server(document, body):
    assert _verdicts(document, body) == (True, True)


@pytest.mark.parametrize("body", INVALID.values(), ids=INVALID.keys())
def test_invalid_bodies_fail_the_document_and_the_server(document, body):
    assert _verdicts(document, body) == (False, False)


@pytest.mark.parametrize("body", UNDOCUMENTABLE.values(), ids=UNDOCUMENTABLE.keys())
def test_known_gaps_between_document_and_server(document, body):
    assert _verdicts(document, body) == (True, False)
