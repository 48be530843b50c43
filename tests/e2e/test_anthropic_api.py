"""The Anthropic Messages API through the real server, with the `anthropic` SDK unmodified: whole and streamed
answers, thinking and tool_use blocks on a real Qwen template and vocabulary, a tool round trip, stop
sequences, token counting, x-api-key auth, and bad input answered in Anthropic's error shape."""

from __future__ import annotations

import json

import anthropic
import pytest
import requests

from tests.conftest import SCRIPT_TEXT
from tests.unit.test_openapi import check_response

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
THOUGHT = "The user asks about the weather. I should call the tool."
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
WEATHER = {"name": "get_weather", "description": "Weather for a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def sdk(base_url: str, api_key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)


def raw_events(base_url: str, **body) -> list[tuple[str, dict]]:
    """(event name, data) of each event of a streamed answer; every data's `type` is its event's name."""
    body = {"model": "qwen", "max_tokens": 100, "messages": USER, "stream": True, **body}
    with requests.post(base_url + "/v1/messages", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode() for line in response.iter_lines() if line]
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert len(names) == len(data) and [d["type"] for d in data] == names
    return list(zip(names, data))


@pytest.fixture(scope="module")
def client(scripted_server) -> anthropic.Anthropic:
    return sdk(scripted_server.base_url)


@pytest.fixture(scope="module")
def qwen(start_server, qwen_scripted_model) -> str:
    """A server on the real Qwen3.5 template and vocabulary whose reply thinks, then calls get_weather."""
    model = qwen_scripted_model("qwen3.5", f"{THOUGHT}\n</think>\n\n{CALL}")
    return start_server("--model", str(model), "--parallel", "1").base_url


# ---- text, streamed and whole ---------------------------------------------------------------------

def test_create_answers_a_message_with_text_and_usage(client):
    message = client.messages.create(model="claude-like", max_tokens=100, system="Be brief.", messages=USER)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "claude-like"
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == SCRIPT_TEXT
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.output_tokens > 5
    counted = client.messages.count_tokens(model="claude-like", system="Be brief.", messages=USER)
    assert counted.input_tokens == message.usage.input_tokens + message.usage.cache_read_input_tokens > 5


def test_stream_sends_anthropics_event_sequence_and_the_sdk_assembles_it(client, scripted_server):
    with client.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == SCRIPT_TEXT == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 5

    events = raw_events(scripted_server.base_url)
    names = [name for name, _ in events if name != "ping"]
    assert names[:2] == ["message_start", "content_block_start"]
    assert set(names[2:-3]) == {"content_block_delta"} and len(names[2:-3]) > 3
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    delta = next(data for name, data in events if name == "message_delta")
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == final.usage.output_tokens


def test_stop_sequences_and_max_tokens_set_the_stop_reason(client):
    stops = {"model": "m", "max_tokens": 100, "messages": USER, "stop_sequences": ["never", "STOP"]}
    message = client.messages.create(**stops)
    assert message.content[0].text == SCRIPT_TEXT.split("STOP")[0]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")
    with client.messages.stream(**stops) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == message.content[0].text
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "STOP")
    cut = client.messages.create(model="m", max_tokens=2, messages=USER)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


# ---- thinking and tools on the real Qwen3.5 template ----------------------------------------------

def test_thinking_and_tool_use_blocks_whole_and_streamed(qwen):
    client = sdk(qwen)
    message = client.messages.create(model="qwen", max_tokens=200, messages=USER, tools=[WEATHER],
                                     extra_body={"temperature": 0, "top_k": 1})
    assert [block.type for block in message.content] == ["thinking", "tool_use"]
    thinking, tool_use = message.content
    assert thinking.thinking == THOUGHT and thinking.signature == ""
    assert tool_use.id.startswith("toolu_") and tool_use.name == "get_weather" and tool_use.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"

    with client.messages.stream(model="qwen", max_tokens=200, messages=USER, tools=[WEATHER],
                                tool_choice={"type": "any"}) as stream:
        final = stream.get_final_message()
    assert [block.type for block in final.content] == ["thinking", "tool_use"]
    assert final.content[0].thinking == THOUGHT and final.content[1].input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    deltas = [data["delta"]["type"] for name, data in raw_events(qwen, tools=[WEATHER], max_tokens=200)
              if name == "content_block_delta"]
    assert {"thinking_delta", "input_json_delta"} <= set(deltas) and deltas.count("thinking_delta") > 3


def test_a_tool_round_trip_renders_as_the_same_history_in_openai_form(qwen):
    client = sdk(qwen)
    first = client.messages.create(model="qwen", max_tokens=200, messages=USER, tools=[WEATHER])
    tool_use = first.content[-1]
    history = [*USER, first.to_param(), {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": tool_use.id, "content": [{"type": "text", "text": "21 C, sunny"}]}]}]
    second = client.messages.create(model="qwen", max_tokens=200, messages=history, tools=[WEATHER])
    assert second.content[-1].type == "tool_use"  # the scripted model always calls; what matters is the prompt
    counted = client.messages.count_tokens(model="qwen", messages=history, tools=[WEATHER]).input_tokens
    assert counted == second.usage.input_tokens + second.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens > 0  # the first turn's prompt was reused

    # The same conversation in OpenAI's form renders to the same prompt (thinking handed back as reasoning).
    openai_history = [*USER, {"role": "assistant", "content": "", "reasoning_content": THOUGHT, "tool_calls": [
        {"id": tool_use.id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": tool_use.id, "content": "21 C, sunny"}]
    tools = [{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                               "parameters": WEATHER["input_schema"]}}]
    chat = requests.post(qwen + "/v1/chat/completions", timeout=60, json={
        "messages": openai_history, "tools": tools, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == counted
    without_thinking = [*USER, {"role": "assistant", "content": [first.content[1].to_dict()]}, history[-1]]
    assert client.messages.count_tokens(model="qwen", messages=without_thinking, tools=[WEATHER]).input_tokens \
        < counted


def test_thinking_disabled_renders_the_closed_block(qwen):
    client = sdk(qwen)
    on = client.messages.count_tokens(model="qwen", messages=USER, thinking={"type": "enabled", "budget_tokens": 1024})
    off = client.messages.count_tokens(model="qwen", messages=USER, thinking={"type": "disabled"})
    chat_off = requests.post(qwen + "/v1/chat/completions", timeout=60, json={
        "messages": USER, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert off.input_tokens == chat_off["usage"]["prompt_tokens"] > on.input_tokens


# ---- auth and errors --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(start_server, tiny_model) -> str:
    return start_server("--model", str(tiny_model), "--api-key", "secret", "--max-body-bytes", "4096").base_url


def test_x_api_key_or_bearer_when_the_server_has_a_key(keyed):
    assert sdk(keyed, "secret").messages.create(model="m", max_tokens=2, messages=USER).stop_reason == "max_tokens"
    with pytest.raises(anthropic.AuthenticationError) as refused:
        sdk(keyed, "wrong").messages.create(model="m", max_tokens=2, messages=USER)
    assert refused.value.status_code == 401
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "authentication_error"
    bearer = requests.post(keyed + "/v1/messages/count_tokens", headers={"Authorization": "Bearer secret"},
                           json={"model": "m", "messages": USER}, timeout=10)
    assert bearer.status_code == 200 and bearer.json()["input_tokens"] > 0
    assert requests.get(keyed + "/v1/models", headers={"x-api-key": "secret"}, timeout=10).status_code == 200
    too_large = requests.post(keyed + "/v1/messages", headers={"x-api-key": "secret"}, timeout=10,
                              json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 5000}]})
    assert too_large.status_code == 413
    assert too_large.json()["error"]["type"] == "request_too_large"


MINIMAL = {"model": "m", "max_tokens": 5, "messages": USER}
BAD_BODIES = {
    "no max_tokens": {"model": "m", "messages": USER},
    "no messages": {"model": "m", "max_tokens": 5},
    "image block": {**MINIMAL, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
    "tool_use in a user turn": {**MINIMAL, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
    "tool_result in an assistant turn": {**MINIMAL, "messages": [*USER, {"role": "assistant", "content": [
        {"type": "tool_result", "tool_use_id": "t"}]}, *USER]},
    "prefill": {**MINIMAL, "messages": [*USER, {"role": "assistant", "content": "The answer is"}]},
    "system role in messages": {**MINIMAL, "messages": [{"role": "system", "content": "x"}]},
    "tool_choice names an unknown tool": {**MINIMAL, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "x"}},
    "tool_choice any without tools": {**MINIMAL, "tool_choice": {"type": "any"}},
    "server tool": {**MINIMAL, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
    "input_schema not an object": {**MINIMAL, "tools": [{**WEATHER, "input_schema": {"type": "string"}}]},
    "empty stop sequence": {**MINIMAL, "stop_sequences": [""]},
    "temperature above 1": {**MINIMAL, "temperature": 1.5},
    "max_tokens as a string": {**MINIMAL, "max_tokens": "5"},
    "unknown thinking type": {**MINIMAL, "thinking": {"type": "sometimes"}},
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_bodies_are_400s_in_anthropics_error_shape(scripted_server, body):
    response = requests.post(scripted_server.base_url + "/v1/messages", json=body, timeout=10)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["message"]


def test_errors_before_any_view_runs_are_in_anthropics_shape_too(scripted_server, client):
    base = scripted_server.base_url
    for response, status in ((requests.post(base + "/v1/messages", data=b"{", timeout=10), 400),
                             (requests.post(base + "/v1/messages", data=b"[]", timeout=10), 400),
                             (requests.get(base + "/v1/messages", timeout=10), 405),
                             (requests.post(base + "/v1/messages/nothing", json={}, timeout=10), 404)):
        assert response.status_code == status
        assert response.json()["type"] == "error" and set(response.json()["error"]) == {"type", "message"}
    with pytest.raises(anthropic.BadRequestError, match="images"):
        client.messages.create(**BAD_BODIES["image block"])
    document = requests.get(base + "/openapi.json", timeout=10).json()
    bad = requests.post(base + "/v1/messages", json=BAD_BODIES["prefill"], timeout=10)
    check_response(document, "/v1/messages", "post", 400, bad.headers["Content-Type"], bad.headers, bad.json())
    ok = requests.post(base + "/v1/messages", json=MINIMAL, timeout=30)
    check_response(document, "/v1/messages", "post", 200, ok.headers["Content-Type"], ok.headers, ok.json())
