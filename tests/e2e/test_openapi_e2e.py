"""The real server's responses match its own /openapi.json: every route, errors, and each streamed chunk."""

from __future__ import annotations

import json

import pytest
import requests
from openapi_spec_validator import OpenAPIV31SpecValidator

from tests.unit.test_openapi import check_response, check_sse_event, documented_response, schema_validator

USER = [{"role": "user", "content": "Hello"}]


def raw_sse_data(response: requests.Response) -> list[str]:
    """The `data:` payloads of a stream, unparsed."""
    return [line[6:].decode("utf-8") for line in response.iter_lines() if line.startswith(b"data: ")]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def document(base_url) -> dict:
    response = requests.get(base_url + "/openapi.json", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    return response.json()


def call(document: dict, method: str, template: str, base_url: str, path: str | None = None,
         **kwargs) -> requests.Response:
    """Send one request and check its answer against the operation `method template` of the document."""
    response = requests.request(method, base_url + (path or template), timeout=60, **kwargs)
    content_type = response.headers.get("Content-Type", "")
    body = response.json() if content_type.startswith("application/json") else (response.content or None)
    check_response(document, template, method.lower(), response.status_code, content_type, response.headers, body)
    return response


def test_the_served_document_is_valid_openapi_3_1(document):
    OpenAPIV31SpecValidator(document).validate()


def test_health_models_page_metrics_and_document_match(document, base_url):
    assert call(document, "GET", "/health", base_url).status_code == 200
    models = call(document, "GET", "/v1/models", base_url)
    assert models.status_code == 200
    model_id = models.json()["data"][0]["id"]
    assert call(document, "GET", "/v1/models/{model_id}", base_url, f"/v1/models/{model_id}").status_code == 200
    missing = call(document, "GET", "/v1/models/{model_id}", base_url, "/v1/models/no-such/model")
    assert missing.status_code == 404
    page = call(document, "GET", "/", base_url)
    assert page.status_code == 200
    again = call(document, "GET", "/", base_url, headers={"If-None-Match": page.headers["ETag"]})
    assert again.status_code == 304
    assert call(document, "GET", "/metrics", base_url).status_code == 200
    assert call(document, "GET", "/openapi.json", base_url).json() == document


@pytest.mark.parametrize("fields", [
    {},
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "temperature": 0},
    {"functions": [WEATHER["function"]], "function_call": {"name": "get_weather"}, "temperature": 0},
], ids=["text", "tool call", "legacy function call"])
def test_chat_answers_match_chat_completion(document, base_url, fields):
    body = {"model": "m", "messages": USER, "max_tokens": 200 if fields else 16, **fields}
    response = call(document, "POST", "/v1/chat/completions", base_url, json=body)
    assert response.status_code == 200, response.text
    if fields:
        assert response.json()["choices"][0]["finish_reason"] in ("tool_calls", "function_call")


@pytest.mark.parametrize("fields", [
    {"stream_options": {"include_usage": True}},
    {"tools": [WEATHER], "tool_choice": "required", "temperature": 0},
], ids=["text with usage", "tool call"])
def test_every_streamed_chat_chunk_matches_chat_completion_chunk(document, base_url, fields):
    body = {"model": "m", "messages": USER, "max_tokens": 200, "stream": True, **fields}
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.status_code == 200
        documented = documented_response(document, "/v1/chat/completions", "post", 200)["content"]
        assert response.headers["Content-Type"].split(";")[0] in documented
        data = raw_sse_data(response)
    assert data[-1] == "[DONE]" and len(data) > 3
    chunk_schema = schema_validator(document, "ChatCompletionChunk")
    for payload in data[:-1]:
        errors = list(chunk_schema.iter_errors(json.loads(payload)))
        assert not errors, f"{payload}: {errors[0].message}"
    for payload in data:
        check_sse_event(document, "/v1/chat/completions", payload)


def test_legacy_completions_match_text_completion_streamed_and_not(document, base_url):
    body = {"model": "m", "prompt": "Once upon", "max_tokens": 8, "echo": True}
    assert call(document, "POST", "/v1/completions", base_url, json=body).status_code == 200
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with requests.post(base_url + "/v1/completions", json=stream, stream=True, timeout=60) as response:
        data = raw_sse_data(response)
    assert data[-1] == "[DONE]"
    for payload in data[:-1]:
        assert schema_validator(document, "TextCompletion").is_valid(json.loads(payload)), payload
    for payload in data:
        check_sse_event(document, "/v1/completions", payload)


@pytest.mark.parametrize("route, body, template", [
    ("/v1/chat/completions", {"messages": USER, "temperature": 5}, "ChatCompletionRequest"),
    ("/v1/chat/completions", {"messages": []}, "ChatCompletionRequest"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"99999999": 1}}, None),
    ("/v1/completions", {"prompt": ""}, "CompletionRequest"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "CompletionRequest"),
])
def test_bad_requests_are_documented_400s(document, base_url, route, body, template):
    response = call(document, "POST", route, base_url, json=body)
    assert response.status_code == 400
    if template is not None:  # the document itself already says no
        assert not schema_validator(document, template).is_valid(body)


def test_error_envelope_of_an_unknown_route_and_method(document, base_url):
    for response, status in ((requests.get(base_url + "/v2/nothing", timeout=10), 404),
                             (requests.delete(base_url + "/v1/models", timeout=10), 405)):
        assert response.status_code == status
        assert schema_validator(document, "ErrorResponse").is_valid(response.json())
    assert "Allow" in requests.put(base_url + "/health", timeout=10).headers


CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
ASSISTANT_TURNS = {
    "tool call": ({"role": "assistant", "content": None, "tool_calls": [CALL]}, True),
    "arguments as an object": ({"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": 1}}}]}, True),
    "legacy function call": ({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}, True),
    "empty legacy function call": ({"role": "assistant", "content": "x", "function_call": {}}, True),
    "calls of a user turn are ignored": ({"role": "user", "content": "x", "tool_calls": [{}]}, True),
    "call without arguments": ({"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}, False),
    "call without function": ({"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{}"}]}, False),
    "call with a numeric name": ({"role": "assistant", "tool_calls": [
        {"function": {"name": 5, "arguments": "{}"}}]}, False),
    "function call without arguments": ({"role": "assistant", "function_call": {"name": "f"}}, False),
}


@pytest.mark.parametrize("turn, accepted", ASSISTANT_TURNS.values(), ids=ASSISTANT_TURNS.keys())
def test_assistant_calls_in_the_history_are_documented_as_the_template_needs_them(document, base_url, turn,
                                                                                   accepted):
    body = {"messages": [*USER, turn, {"role": "user", "content": "and?"}], "max_tokens": 1}
    response = call(document, "POST", "/v1/chat/completions", base_url, json=body)
    assert (response.status_code == 200) is accepted, response.text
    assert schema_validator(document, "ChatCompletionRequest").is_valid(body) is accepted
