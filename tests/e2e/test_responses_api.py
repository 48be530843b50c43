"""POST /v1/responses through the real server with the real clients: the openai SDK's `responses.create` /
`.stream` and the OpenAI Agents SDK's default model, on scripted models with the real Qwen templates and
vocabulary (Qwen3-Coder for answers and forced calls, Qwen3.5 for reasoning)."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import openai
import pytest
import requests
from pydantic import BaseModel

from edge_server.api.responses_schemas import ResponseObject, ResponseStreamEvent

THOUGHT = "The user asks about the weather. I should call the tool."
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
ANSWER = "The capital of France is Paris."
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
COUNT = {"type": "function", "name": "count", "description": "Count to n", "strict": True, "parameters": {
    "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}}
# A grammar-forced call on the 151,936-token vocabulary takes seconds: greedy, one call (the Agents SDK test).
FORCED = {"tool_choice": "required", "temperature": 0, "parallel_tool_calls": False, "max_output_tokens": 300}
CITY_SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
               "additionalProperties": False}


@pytest.fixture(scope="module")
def coder(start_server, qwen_scripted_model) -> str:
    """A Qwen3-Coder model that answers ANSWER unless a grammar forces a call (XML dialect)."""
    model = qwen_scripted_model("qwen3-coder", ANSWER)
    return start_server("--model", str(model), "--parallel", "1").base_url


@pytest.fixture(scope="module")
def thinker(start_server, qwen_scripted_model) -> str:
    """A Qwen3.5 model that thinks THOUGHT, then calls get_weather (the same model as the Anthropic tests)."""
    model = qwen_scripted_model("qwen3.5", f"{THOUGHT}\n</think>\n\n{CALL}")
    return start_server("--model", str(model), "--parallel", "1").base_url


def sdk(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def raw_events(base_url: str, **body) -> list[tuple[str, dict]]:
    """(event, data) of a streamed response, each data checked against the event model."""
    body = {"model": "qwen", "stream": True, **body}
    with requests.post(base_url + "/v1/responses", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = response.text
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
            name, data = lines[0][7:], json.loads(lines[1][6:])
            assert data["type"] == name
            ResponseStreamEvent.model_validate(data)
            events.append((name, data))
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    return events


def test_create_with_a_string_input_and_instructions(coder):
    response = sdk(coder).responses.create(model="qwen", input="What is the capital of France?",
                                           instructions="Be brief.", temperature=0, max_output_tokens=100,
                                           metadata={"run": "1"})
    assert response.status == "completed" and response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == ANSWER
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.instructions == "Be brief." and response.metadata == {"run": "1"}
    ResponseObject.model_validate(response.model_dump())


def test_create_with_items_and_an_output_limit(coder):
    client = sdk(coder)
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "user", "content": "What is the capital of France?"}]
    assert client.responses.create(model="qwen", input=items).output_text == ANSWER
    cut = client.responses.create(model="qwen", input=items, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3 and ANSWER.startswith(cut.output_text)


def test_a_function_call_streamed_and_the_round_trip_with_its_output(thinker):
    client = sdk(thinker)
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.responses.stream(model="qwen", input=question, tools=[WEATHER], max_output_tokens=200) as stream:
        arguments = "".join(event.delta for event in stream if event.type == "response.function_call_arguments.delta")
        first = stream.get_final_response()
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == THOUGHT
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Paris"} and call.arguments == arguments
    assert first.tool_choice == "auto" and first.tools[0].name == "get_weather"

    # The reasoning, the call and its output go back as items: the same prompt as the chat form of the history.
    history = [*question, *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "21 C, sunny"}]
    second = client.responses.create(model="qwen", input=history, tools=[WEATHER], max_output_tokens=200)
    assert second.output[-1].type == "function_call"  # the scripted model always calls; what matters is the prompt
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first turn's prompt was reused
    chat = requests.post(thinker + "/v1/chat/completions", timeout=60, json={"max_tokens": 1, "messages": [
        *question, {"role": "assistant", "content": None, "reasoning_content": THOUGHT, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "21 C, sunny"}],
        "tools": [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]}).json()
    assert chat["usage"]["prompt_tokens"] == second.usage.input_tokens


def test_json_schema_format_is_enforced_and_parsed(coder):
    class City(BaseModel):
        city: Literal["Paris", "Rome"]

    client = sdk(coder)
    response = client.responses.create(model="qwen", input="A city as JSON", max_output_tokens=50, temperature=0, text={
        "format": {"type": "json_schema", "name": "city", "schema": CITY_SCHEMA, "strict": True}})
    assert json.loads(response.output_text)["city"] in ("Paris", "Rome")
    assert response.text.format.type == "json_schema" and response.text.format.name == "city"
    parsed = client.responses.parse(model="qwen", input="A city as JSON", text_format=City, max_output_tokens=50,
                                    temperature=0)
    assert parsed.output_parsed.city in ("Paris", "Rome")


def test_stream_events_in_order_and_deltas_equal_the_final_text(coder):
    events = raw_events(coder, input="What is the capital of France?")
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [data["delta"] for name, data in events if name == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == ANSWER
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == ANSWER

    with sdk(coder).responses.stream(model="qwen", input="What is the capital of France?") as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text == ANSWER and final.status == "completed"

    calls = list(sdk(coder).responses.create(model="qwen", input="Hi", stream=True, max_output_tokens=3))
    assert calls[-1].type == "response.incomplete" and calls[-1].response.incomplete_details.reason == "max_output_tokens"


def test_reasoning_becomes_a_reasoning_item_streamed_and_whole(thinker):
    client = sdk(thinker)
    # Without tools, the call markup is the answer's text.
    response = client.responses.create(model="qwen", input="What is the weather?", reasoning={"effort": "high"},
                                       max_output_tokens=200)
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == THOUGHT and reasoning.summary == []
    assert message.content[0].text == CALL == response.output_text
    assert 10 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    assert response.reasoning.effort == "high"

    events = raw_events(thinker, input="What is the weather?", max_output_tokens=200)
    assert "".join(data["delta"] for name, data in events if name == "response.reasoning_text.delta") == THOUGHT
    assert "".join(data["delta"] for name, data in events if name == "response.output_text.delta") == CALL
    first_message = next(i for i, (name, data) in enumerate(events) if name == "response.output_item.added"
                         and data["item"]["type"] == "message")
    assert [name for name, _ in events[first_message - 2:first_message]] == [
        "response.reasoning_text.done", "response.output_item.done"]
    assert events[-1][1]["response"]["output"][0]["content"] == [{"type": "reasoning_text", "text": THOUGHT}]


def test_the_agents_sdk_runs_a_function_tool_round_trip_on_its_default_model(coder):
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    calls: list[int] = []

    @function_tool
    def count(n: int) -> str:
        """Count to n."""
        calls.append(n)
        return ", ".join(str(i) for i in range(1, min(n, 5) + 1))

    set_tracing_disabled(True)
    set_default_openai_client(openai.AsyncOpenAI(base_url=coder + "/v1", api_key="none", max_retries=0), use_for_tracing=False)
    # Forced the first time (the SDK resets tool_choice once a tool ran): the scripted model then answers.
    agent = Agent(name="counter", instructions="Count when asked.", tools=[count],
                  model_settings=ModelSettings(tool_choice="required", max_tokens=300, temperature=0,
                                               parallel_tool_calls=False))
    result = asyncio.run(Runner.run(agent, "Count for me."))
    assert len(calls) == 1 and result.final_output == ANSWER
    kinds = [item.type for item in result.new_items]
    assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]


BAD_BODIES = {
    "not JSON": b"{",
    "an array": b"[]",
    "empty": b"",
    "input an object": b'{"input": {"role": "user"}}',
    "item of an unknown type": b'{"input": [{"type": "computer_call", "id": "x"}]}',
    "image input": b'{"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}',
    "hosted tool chosen": b'{"input": "x", "tools": [{"type": "file_search", "vector_store_ids": []}], '
                          b'"tool_choice": {"type": "file_search"}}',
    "tool choice of an unknown function": b'{"input": "x", "tools": [{"type": "function", "name": "f"}], '
                                          b'"tool_choice": {"type": "function", "name": "g"}}',
    "stored state": b'{"input": "x", "previous_response_id": "resp_1"}',
    "deep nesting": b'{"input": "x", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "schema that is not a schema": b'{"input": "x", "text": {"format": {"type": "json_schema", "name": "n", '
                                   b'"schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}}',
    "stream not a bool": b'{"input": "x", "stream": "yes"}',
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_bodies_are_400s_in_the_error_envelope(coder, body):
    response = requests.post(coder + "/v1/responses", data=body, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_the_sdk_raises_on_a_bad_request(coder):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(coder).responses.create(model="qwen", input="x", previous_response_id="resp_1")
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "previous_response_id"
