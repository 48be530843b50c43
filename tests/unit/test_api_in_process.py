"""Routes and the generation pipeline in-process on the fake engine: fast checks of the layers above the engine.

The same behaviours are proven through the real engine and HTTP server in tests/e2e/.
"""

from __future__ import annotations

import json

import pytest

from edge_server.api.app import create_app
from edge_server.api.state import ServedModel
from edge_server.devtools.fake_engine import FakeEngine
from edge_server.engine.types import ENGINE_STOPPED, SHUTTING_DOWN, FinishReason
from edge_server.settings import Settings

USER = [{"role": "user", "content": "Hi"}]


def client_for(engine: FakeEngine):
    return create_app(Settings(threads=1), ServedModel.of(engine, "fake-model")).test_client()


def chat(client, **fields):
    return client.post("/v1/chat/completions", json={"messages": USER, **fields})


def events(response) -> list:
    payloads = [line[6:] for line in response.get_data(as_text=True).split("\n") if line.startswith("data: ")]
    return [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


def test_whole_answer_carries_the_pieces_and_usage():
    engine = FakeEngine()
    body = chat(client_for(engine), model="gpt-3.5-turbo").get_json()
    assert body["model"] == "gpt-3.5-turbo"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt_tokens = len(engine.jobs[0].prompt)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 4, "total_tokens": prompt_tokens + 4,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert body["system_fingerprint"].startswith("fp_")


def test_stream_has_role_deltas_finish_usage_and_done():
    response = chat(client_for(FakeEngine()), stream=True, stream_options={"include_usage": True})
    assert response.mimetype == "text/event-stream"
    chunks = events(response)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-3]) == "Hello, world!"
    assert chunks[-3]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == 4
    assert chunks[-1] == "[DONE]"


def test_max_tokens_cuts_with_length():
    body = chat(client_for(FakeEngine()), max_tokens=2).get_json()
    assert body["choices"][0]["message"]["content"] == "Hello,"
    assert body["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_across_pieces():
    body = chat(client_for(FakeEngine()), stop=["o, w"]).get_json()
    assert body["choices"][0]["message"]["content"] == "Hell"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_tool_call_block_becomes_tool_calls():
    pieces = (b"<tool_", b'call>\n{"name": "f", ', b'"arguments": {"a": 1}}\n</tool_call>')
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = chat(client_for(FakeEngine(pieces=pieces)), tools=tools).get_json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in choice["message"]["tool_calls"]] \
        == [("f", {"a": 1})]


def test_structured_output_hands_the_engine_a_compiled_grammar():
    engine = FakeEngine(pieces=(b"{}",))
    chat(client_for(engine), response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object"}}})
    assert len(engine.grammars) == 1 and engine.jobs[0].sampling.grammar.text == engine.grammars[0]


def test_full_queue_is_a_429_with_retry_after():
    response = chat(client_for(FakeEngine(queue_full=True)))
    assert response.status_code == 429 and response.headers["Retry-After"] == "1"
    assert response.get_json()["error"]["code"] == "queue_full"


@pytest.mark.parametrize("engine, status, code", [
    (FakeEngine(finish=FinishReason.CANCELLED), 503, ENGINE_STOPPED),
    (FakeEngine(finish=FinishReason.ERROR, error_code=SHUTTING_DOWN), 503, SHUTTING_DOWN),
    (FakeEngine(finish=FinishReason.ERROR), 500, "generation_failed"),
], ids=["engine closed", "shutting down", "failed"])
def test_a_job_the_engine_ended_is_an_error_never_a_silent_stop(engine, status, code):
    whole = chat(client_for(engine))
    assert whole.status_code == status and whole.get_json()["error"]["code"] == code
    chunks = events(chat(client_for(engine), stream=True))
    assert chunks[-1]["error"]["code"] == code
    assert not any(isinstance(c, dict) and c.get("choices") and c["choices"][0]["finish_reason"] for c in chunks)


def test_prompt_past_the_context_is_a_400_before_the_engine_sees_it():
    engine = FakeEngine(n_ctx=64)
    response = chat(client_for(engine), messages=[{"role": "user", "content": "x" * 100}])
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "context_length_exceeded"
    assert engine.jobs == []


def test_legacy_completion_stream_and_echo():
    client = client_for(FakeEngine())
    body = client.post("/v1/completions", json={"prompt": "Say: ", "echo": True}).get_json()
    assert body["choices"][0]["text"] == "Say: Hello, world!"
    chunks = events(client.post("/v1/completions", json={"prompt": "Say: ", "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == "Hello, world!"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_health_and_models_describe_the_served_engine():
    client = client_for(FakeEngine())
    health = client.get("/health").get_json()
    assert health["status"] == "ok" and health["threads_in_use"] == 1 and health["running"] == 0
    assert client.get("/v1/models").get_json()["data"][0]["id"] == "fake-model"
    assert client.get("/v1/models/other").status_code == 404
