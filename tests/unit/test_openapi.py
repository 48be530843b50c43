"""GET /openapi.json: a valid OpenAPI 3.1 document generated from the schemas, covering every route,
whose request schemas accept what the server accepts and reject what it rejects (Flask test client)."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator

import edge_server
from edge_server.api import openapi
from edge_server.api.app import create_app
from edge_server.api.declaration import Reply, documented
from edge_server.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    Delta,
    FunctionCall,
    FunctionDelta,
    ModelCard,
    TextCompletion,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from edge_server.settings import Settings

# ---- helpers shared with tests/e2e/test_openapi_e2e.py -------------------------------------------

ERROR_STATUSES = {"400", "401", "404", "405", "413", "429", "500", "503"}


def schema_validator(document: dict[str, Any], name_or_schema: str | dict[str, Any]) -> Draft202012Validator:
    """A JSON-schema validator for a component (by name) or any schema of `document`, its `$ref`s resolved."""
    schema = {"$ref": f"#/components/schemas/{name_or_schema}"} if isinstance(name_or_schema, str) else name_or_schema
    return Draft202012Validator({**schema, "components": document["components"]})


def resolve(document: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (responses, headers) to its target."""
    while "$ref" in node and len(node) == 1 and not node["$ref"].startswith("#/components/schemas/"):
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def documented_response(document: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    """The response object the document gives for `status` of one operation (fails when undocumented)."""
    responses = document["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} does not document {status}: {sorted(responses)}"
    return resolve(document, responses[str(status)])


def check_response(document: dict[str, Any], path: str, method: str, status: int, content_type: str,
                   headers: dict[str, str], body: Any) -> None:
    """Assert a real response (status, media type, required headers, JSON body) matches the document."""
    response = documented_response(document, path, method, status)
    for name, header in response.get("headers", {}).items():
        header = resolve(document, header)
        if header.get("required"):
            assert name in headers, f"{method} {path} {status}: missing header {name}"
    if "content" not in response:
        assert body is None, f"{method} {path} {status}: a body where the document says none"
        return
    media_type = content_type.split(";")[0].strip()
    assert media_type in response["content"], f"{method} {path} {status}: undocumented {media_type}"
    if media_type == "application/json":
        schema = response["content"][media_type]["schema"]
        errors = sorted(schema_validator(document, schema).iter_errors(body), key=str)
        assert not errors, f"{method} {path} {status}: {errors[0].message} at {list(errors[0].absolute_path)}"


def sse_data_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema of the JSON in a stream's `data:` fields (the event schema's `contentSchema`)."""
    event = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    [json_data] = [option for option in event["properties"]["data"]["anyOf"] if "contentSchema" in option]
    assert json_data["contentMediaType"] == "application/json"
    return json_data["contentSchema"]


def check_sse_event(document: dict[str, Any], path: str, data: str) -> None:
    """Assert one `data:` payload of a stream matches the document, as an SSE-aware tool checks it."""
    event = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    errors = list(schema_validator(document, event).iter_errors({"event": "message", "data": data}))
    assert not errors, f"{path} event {data!r}: {errors[0].message}"
    if data != "[DONE]":
        payload = json.loads(data)
        errors = list(schema_validator(document, sse_data_schema(document, path)).iter_errors(payload))
        assert not errors, f"{path} event {data!r}: {errors[0].message}"


def flask_path(rule: str) -> str:
    """`/v1/models/<path:model_id>` -> `/v1/models/{model_id}`."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule)


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app():
    return create_app(Settings(threads=1))


@pytest.fixture(scope="module")
def client(app):
    return app.test_client()


@pytest.fixture(scope="module")
def document(client) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


# ---- the document itself ------------------------------------------------------------------------

def test_document_is_valid_openapi_3_1(document):
    OpenAPIV31SpecValidator(document).validate()
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "edge-server"
    assert document["info"]["version"] == edge_server.__version__
    assert document["servers"] == [{"url": "/"}]


def test_served_as_json_and_built_once_per_app(app, client, monkeypatch):
    first = client.get("/openapi.json")
    assert first.status_code == 200
    assert first.mimetype == "application/json"
    built = []
    monkeypatch.setattr(openapi, "build_document", lambda **kw: built.append(kw) or {})
    assert client.get("/openapi.json").data == first.data  # cached: not rebuilt
    assert built == []
    other = create_app(Settings(threads=1)).test_client().get("/openapi.json")
    assert other.status_code == 200 and len(built) == 1  # another app builds its own


def test_every_route_of_the_app_is_documented_and_nothing_else(app, document):
    routes = {
        (flask_path(rule.rule), method.lower())
        for rule in app.url_map.iter_rules() if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    assert documented == routes


def test_a_route_without_a_declaration_fails_the_document():
    app = create_app(Settings(threads=1))
    app.add_url_rule("/v1/undeclared", "undeclared", lambda: "")
    with pytest.raises(LookupError, match="'undeclared' has no @documented"):
        openapi.build_document(app=app)
    assert app.test_client().get("/openapi.json").status_code == 500


def test_declared_routes_are_documented_from_their_declarations():
    app = create_app(Settings(threads=1))

    @app.post("/v1/echo/<name>")
    @documented("echo", "models", "Echo", {200: Reply("The echo.", ModelCard)}, body=CompletionRequest,
                errors=(404,), params={"name": "what to echo"})
    def echo(name):
        return name

    operation = openapi.build_document(app=app)["paths"]["/v1/echo/{name}"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionRequest"}
    assert operation["parameters"] == [{"name": "name", "in": "path", "required": True,
                                        "description": "what to echo", "schema": {"type": "string", "minLength": 1}}]
    assert sorted(operation["responses"]) == ["200", "400", "401", "404", "413", "500"]
    assert operation["security"] == [{}, {"bearer": []}]


def test_every_error_response_is_the_envelope(document):
    components = document["components"]["responses"]
    by_status = {}
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "500" in operation["responses"], f"{method} {path}"
            for status, response in operation["responses"].items():
                if int(status) < 400 or (path, status) == ("/health", "503") or path.startswith("/v1/messages"):
                    continue  # the Anthropic routes answer in Anthropic's envelope (tests/unit/test_anthropic_api.py)
                by_status.setdefault(status, set()).add(response.get("$ref"))
                response = resolve(document, response)
                assert response["content"] == {"application/json": {"schema": {
                    "$ref": "#/components/schemas/ErrorResponse"}}}, f"{method} {path} {status}"
    for response in components.values():
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert ERROR_STATUSES - {"405"} == set(by_status)
    assert "MethodNotAllowed" in components and "Allow" in components["MethodNotAllowed"]["headers"]
    assert components["TooManyRequests"]["headers"]["Retry-After"]["required"] is True
    assert components["ServiceUnavailable"]["headers"]["Retry-After"]["required"] is True
    envelope = document["components"]["schemas"]["ErrorResponse"]
    error = resolve(document, envelope["properties"]["error"])
    error = document["components"]["schemas"]["Error"] if "$ref" in error else error
    assert set(error["required"]) == {"message", "type", "param", "code"}


def test_health_documents_ok_and_loading_bodies(document, client):
    responses = document["paths"]["/health"]["get"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Health"}
    response = client.get("/health")
    check_response(document, "/health", "get", response.status_code, response.content_type, response.headers,
                   response.get_json())


def test_chat_documents_json_and_event_stream_with_the_chunk_schema(document):
    ok = document["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    event = ok["text/event-stream"]["schema"]
    assert "ChatCompletionChunk" in event["description"]
    assert sse_data_schema(document, "/v1/chat/completions")["oneOf"] == [
        {"$ref": "#/components/schemas/ChatCompletionChunk"}, {"$ref": "#/components/schemas/ErrorResponse"}]
    assert schema_validator(document, event).is_valid({"event": "message", "data": "[DONE]"})
    assert not schema_validator(document, event).is_valid({"event": "message"})
    assert "ChatCompletionChunk" in document["components"]["schemas"]
    legacy = document["paths"]["/v1/completions"]["post"]
    assert legacy["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CompletionRequest"}
    assert legacy["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TextCompletion"}


def test_v1_operations_take_an_optional_bearer_key_unless_one_is_configured(document):
    assert document["components"]["securitySchemes"]["bearer"] == {
        **document["components"]["securitySchemes"]["bearer"], "type": "http", "scheme": "bearer"}
    for path, item in document["paths"].items():
        for operation in item.values():
            if path.startswith("/v1/"):
                assert operation["security"] == [{}, {"bearer": []}]
                assert "401" in operation["responses"]
            else:
                assert "security" not in operation
    keyed = create_app(Settings(threads=1, api_key="k")).test_client().get("/openapi.json").get_json()
    assert keyed["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]


def test_wire_names_are_used(document):
    schemas = document["components"]["schemas"]
    assert "schema" in schemas["JsonSchemaFormat"]["properties"]
    assert "schema_" not in schemas["JsonSchemaFormat"]["properties"]


# ---- request bodies: the document and the server agree ------------------------------------------

USER = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

VALID_CHAT = {
    "minimal": {"messages": USER},
    "n 2": {"messages": USER, "n": 2},
    "everything sampled": {"messages": USER, "model": "m", "max_tokens": 5, "temperature": 0, "top_p": 1,
                           "top_k": 0, "min_p": 0, "presence_penalty": -2, "frequency_penalty": 2,
                           "repeat_penalty": 10, "seed": 2**64 - 1, "n": 1, "user": "u"},
    "float temperature given as int": {"messages": USER, "temperature": 2},
    "stream with usage": {"messages": USER, "stream": True, "stream_options": {"include_usage": True}},
    "content parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
    "null content and developer role": {"messages": [{"role": "developer", "content": None}, *USER]},
    "stop string": {"messages": USER, "stop": "x"},
    "sixteen stops": {"messages": USER, "stop": [str(i) for i in range(16)]},
    "logit bias": {"messages": USER, "logit_bias": {"15": 2.5, " 7 ": -100}},
    "integer fields given as whole floats": {"messages": USER, "max_tokens": 3.0, "seed": -2.0, "top_k": 5.0},
    "tools required": {"messages": USER, "tools": [TOOL], "tool_choice": "required"},
    "named tool": {"messages": USER, "tools": [TOOL],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "legacy functions": {"messages": USER, "functions": [TOOL["function"]], "function_call": {"name": "get_weather"}},
    "empty tools with functions": {"messages": USER, "tools": [], "functions": [TOOL["function"]]},
    "parameters without type": {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"properties": {}}}}]},
    "json schema format": {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}},
    "json object format": {"messages": USER, "response_format": {"type": "json_object"}},
    "unknown field": {"messages": USER, "frobnicate": True},
    "tool turn": {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]},
    "history call with arguments as an object": {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]},
}


def _history_call(function) -> list[dict]:
    return [*USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                          "function": function}]}]

INVALID_CHAT = {
    "temperature 5": {"messages": USER, "temperature": 5},
    "empty messages": {"messages": []},
    "missing messages": {"model": "m"},
    "unknown role": {"messages": [{"role": "robot", "content": "x"}]},
    "content number": {"messages": [{"role": "user", "content": 42}]},
    "image part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    "text part without text": {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    "top_p zero": {"messages": USER, "top_p": 0},
    "max_tokens zero": {"messages": USER, "max_tokens": 0},
    "seed too big": {"messages": USER, "seed": 2**64},
    "n 129": {"messages": USER, "n": 129},
    "n 0": {"messages": USER, "n": 0},
    "stream string": {"messages": USER, "stream": "yes"},
    "empty stop": {"messages": USER, "stop": ""},
    "empty stop in list": {"messages": USER, "stop": ["a", ""]},
    "seventeen stops": {"messages": USER, "stop": [str(i) for i in range(17)]},
    "logit bias word key": {"messages": USER, "logit_bias": {"hello": 1}},
    "logit bias too big": {"messages": USER, "logit_bias": {"5": 101}},
    "tools and functions": {"messages": USER, "tools": [TOOL], "functions": [TOOL["function"]]},
    "required without tools": {"messages": USER, "tool_choice": "required"},
    "named tool without tools": {"messages": USER,
                                 "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    "named function without functions": {"messages": USER, "function_call": {"name": "f"}},
    "bad function name": {"messages": USER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
    "parameters not an object schema": {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]},
    "json_schema format without schema": {"messages": USER, "response_format": {"type": "json_schema"}},
    "unknown format": {"messages": USER, "response_format": {"type": "yaml"}},
    "history call function a string": {"messages": _history_call("x")},
    "history call arguments a number": {"messages": _history_call({"name": "f", "arguments": 5})},
    "history call without arguments": {"messages": _history_call({"name": "f"})},
    "history call with an empty name": {"messages": _history_call({"name": "", "arguments": "{}"})},
    "history legacy call name a number": {"messages": [*USER, {"role": "assistant", "function_call": {
        "name": 1, "arguments": "{}"}}]},
}

# What the document cannot say: the server rejects these although they match the schema.
UNDOCUMENTABLE_CHAT = {
    "named tool not among the tools": {"messages": USER, "tools": [TOOL],
                                       "tool_choice": {"type": "function", "function": {"name": "other"}}},
}

VALID_COMPLETION = {
    "string": {"prompt": "Once"},
    "one-item list": {"prompt": ["Once"], "echo": True, "max_tokens": 3},
    "empty suffix": {"prompt": "Once", "suffix": ""},
    "null suffix": {"prompt": "Once", "suffix": None},
    "two prompts": {"prompt": ["a", "b"]},
    "token ids": {"prompt": [1, 2, 3]},
    "lists of token ids": {"prompt": [[1, 2], [3]], "n": 2},
    "n 3": {"prompt": "a", "n": 3},
}

INVALID_COMPLETION = {
    "missing prompt": {"max_tokens": 3},
    "no prompts": {"prompt": []},
    "an empty token list": {"prompt": [[1], []]},
    "a negative token id": {"prompt": [1, -2]},
    "mixed texts and ids": {"prompt": ["a", 1]},
    "suffix": {"prompt": "a", "suffix": "b"},
    "max_tokens zero": {"prompt": "a", "max_tokens": 0},
}


def _verdicts(document, client, path, schema_name, body):
    accepted_by_schema = schema_validator(document, schema_name).is_valid(body)
    response = client.post(path, json=body)
    # Without a model, whatever passes validation stops at 503 model_loading.
    assert response.status_code in (400, 503), response.get_json()
    return accepted_by_schema, response.status_code != 400, response.get_json()


@pytest.mark.parametrize("body", VALID_CHAT.values(), ids=VALID_CHAT.keys())
def test_valid_chat_requests_match_the_schema_and_pass_the_server(document, client, body):
    by_schema, by_server, answer = _verdicts(document, client, "/v1/chat/completions", "ChatCompletionRequest", body)
    assert by_schema, "the document rejects a body the server accepts"
    assert by_server, answer


@pytest.mark.parametrize("body", INVALID_CHAT.values(), ids=INVALID_CHAT.keys())
def test_invalid_chat_requests_fail_the_schema_and_the_server(document, client, body):
    by_schema, by_server, answer = _verdicts(document, client, "/v1/chat/completions", "ChatCompletionRequest", body)
    assert not by_server, "the server accepts a body it should reject"
    assert not by_schema, f"the document accepts a body the server rejects: {answer}"


@pytest.mark.parametrize("body", UNDOCUMENTABLE_CHAT.values(), ids=UNDOCUMENTABLE_CHAT.keys())
def test_known_gaps_between_schema_and_server(document, client, body):
    by_schema, by_server, _ = _verdicts(document, client, "/v1/chat/completions", "ChatCompletionRequest", body)
    assert (by_schema, by_server) == (True, False)


@pytest.mark.parametrize("body", VALID_COMPLETION.values(), ids=VALID_COMPLETION.keys())
def test_valid_completion_requests(document, client, body):
    by_schema, by_server, answer = _verdicts(document, client, "/v1/completions", "CompletionRequest", body)
    assert (by_schema, by_server) == (True, True), answer


@pytest.mark.parametrize("body", INVALID_COMPLETION.values(), ids=INVALID_COMPLETION.keys())
def test_invalid_completion_requests(document, client, body):
    by_schema, by_server, answer = _verdicts(document, client, "/v1/completions", "CompletionRequest", body)
    assert (by_schema, by_server) == (False, False), answer


def test_the_documents_own_examples_are_valid(document):
    for path, schema_name in (("/v1/chat/completions", "ChatCompletionRequest"),
                              ("/v1/completions", "CompletionRequest")):
        media = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert media["examples"]
        for name, example in media["examples"].items():
            errors = list(schema_validator(document, schema_name).iter_errors(example["value"]))
            assert not errors, f"{path} example {name}: {errors[0].message}"


# ---- responses: what the serializers write matches the document ---------------------------------

def _dump(model) -> Any:
    return json.loads(model.model_dump_json())


CALL = FunctionCall(name="f", arguments='{"a": 1}')
CHUNKS = {
    "role": [ChunkChoice(delta=Delta(role="assistant", content=""))],
    "content": [ChunkChoice(delta=Delta(content="hi"))],
    "call start": [ChunkChoice(delta=Delta(tool_calls=[ToolCallDelta(
        index=0, id="call_1", type="function", function=FunctionDelta(name="f", arguments=""))]))],
    "call arguments": [ChunkChoice(delta=Delta(tool_calls=[ToolCallDelta(index=0, function=FunctionDelta(
        arguments='{"a"'))]))],
    "legacy function": [ChunkChoice(delta=Delta(function_call=FunctionDelta(name="f", arguments="")))],
    "finish": [ChunkChoice(delta=Delta(), finish_reason="stop")],
    "usage": [],
}


@pytest.mark.parametrize("choices", CHUNKS.values(), ids=CHUNKS.keys())
def test_every_kind_of_chunk_matches_the_chunk_schema(document, choices):
    usage = Usage.of(3, 4) if not choices else None
    chunk = _dump(ChatCompletionChunk(id="c", created=1, model="m", choices=choices, usage=usage))
    assert schema_validator(document, "ChatCompletionChunk").is_valid(chunk), chunk


def test_answers_match_their_schemas_and_nulls_left_out_are_not_allowed(document):
    answers = [
        ChatCompletion(id="c", created=1, model="m", usage=Usage.of(1, 2), choices=[ChatChoice(
            message=AssistantMessage(content="hi"), finish_reason="stop")]),
        ChatCompletion(id="c", created=1, model="m", usage=Usage.of(1, 2), choices=[ChatChoice(
            message=AssistantMessage(content=None, tool_calls=[ToolCall(id="t", function=CALL)]),
            finish_reason="tool_calls")]),
        ChatCompletion(id="c", created=1, model="m", usage=Usage.of(1, 2), choices=[ChatChoice(
            message=AssistantMessage(content=None, function_call=CALL), finish_reason="function_call")]),
    ]
    for answer in answers:
        assert schema_validator(document, "ChatCompletion").is_valid(_dump(answer))
    for text in (TextCompletion(id="t", created=1, model="m", usage=Usage.of(1, 1),
                                choices=[CompletionChoice(text="x", finish_reason="length")]),
                 TextCompletion(id="t", created=1, model="m", choices=[CompletionChoice(text="x")])):
        assert schema_validator(document, "TextCompletion").is_valid(_dump(text))
    # The document is as strict as the wire: a null where the serializer leaves the key out is wrong.
    chunk = _dump(ChatCompletionChunk(id="c", created=1, model="m", choices=[ChunkChoice(delta=Delta(content="x"))]))
    for broken in ({"content": None}, {"role": None}, {"tool_calls": None}):
        bad = copy.deepcopy(chunk)
        bad["choices"][0]["delta"].update(broken)
        assert not schema_validator(document, "ChatCompletionChunk").is_valid(bad), broken
    assert not schema_validator(document, "ChatCompletionChunk").is_valid({**chunk, "usage": None})
    answer = _dump(answers[0])
    del answer["choices"][0]["message"]["content"]  # content stays, even when null
    assert not schema_validator(document, "ChatCompletion").is_valid(answer)


def test_error_responses_of_the_app_without_a_model_match_the_document(document):
    app = create_app(Settings(threads=1, max_body_bytes=2048))
    client = app.test_client()
    cases = [
        ("get", "/v1/models", {}, 503),
        ("get", "/v1/models/anything", {}, 503),
        ("post", "/v1/chat/completions", {"json": {"messages": USER}}, 503),
        ("post", "/v1/chat/completions", {"json": {"messages": []}}, 400),
        ("post", "/v1/chat/completions", {"data": b"{", "content_type": "application/json"}, 400),
        ("post", "/v1/completions", {"data": b"x" * 4096, "content_type": "application/json"}, 413),
        ("get", "/health", {}, 503),
    ]
    for method, path, kwargs, status in cases:
        response = getattr(client, method)(path, **kwargs)
        assert response.status_code == status, (path, response.get_json())
        template = next(p for p in document["paths"] if re.fullmatch(re.sub(r"\{[^}]+\}", ".+", p), path))
        check_response(document, template, method, status, response.content_type, response.headers,
                       response.get_json())
    keyed = create_app(Settings(threads=1, api_key="k")).test_client().get("/v1/models")
    check_response(document, "/v1/models", "get", 401, keyed.content_type, keyed.headers, keyed.get_json())
    not_allowed = client.post("/health")
    assert not_allowed.status_code == 405
    component = document["components"]["responses"]["MethodNotAllowed"]
    assert "Allow" in not_allowed.headers
    assert schema_validator(document, component["content"]["application/json"]["schema"]).is_valid(
        not_allowed.get_json())
