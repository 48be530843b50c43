"""`GET /openapi.json`: the API described from the pydantic schemas (OpenAPI 3.1).

Request bodies use the schemas' validation-mode JSON schema, responses their serialization-mode one,
both with wire names (aliases). Two things pydantic cannot see are added here, each derived or checked
so that a change in `schemas.py` shows up in the document or fails its tests:

- The response models' custom serializers (`_Sparse`, `_UsageWhenSet`) leave out keys whose value is
  null. The serializer is annotated `-> dict[str, Any]`, which pydantic would document as "any object";
  `_WireJsonSchema` documents the fields instead and asks each serializer which null keys it drops.
- The request validators (`n` must be 1, at most 16 non-empty stop strings, text-only content parts...)
  are restated as JSON-schema keywords in `_VALIDATOR_RULES`; tests/unit/test_openapi.py checks that
  the server rejects what the document rejects and accepts what it accepts.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal

from flask import Blueprint, Flask, Response, current_app
from pydantic import BaseModel, Field
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core import core_schema

from edge_server import __version__
from edge_server.api.state import state_of
from edge_server.api.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    MAX_STOP_CHARACTERS,
    ModelList,
    RequestModel,
    TextCompletion,
)

spec = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
_CACHE_KEY = "edge_server_openapi"


# ---- small response bodies that have no pydantic model elsewhere -------------------------------

class Health(BaseModel):
    """GET /health once the model is loaded."""

    status: Literal["ok"]
    model: str = Field(description="the id /v1/models shows")
    demo: bool = Field(description="true when serving the generated demo model")
    backend: str = Field(description="llama.cpp backend, e.g. CPU, CUDA, Metal")
    gpu_layers: int = Field(description="layers offloaded to the GPU")
    n_ctx: int = Field(description="tokens per request, prompt + completion")
    threads: int = Field(description="the most threads decoding may use (--threads)")
    threads_in_use: int = Field(description="threads decoding uses now: fewer while fewer run faster, "
                                            "e.g. beside another busy process (unless --fixed-threads)")
    parallel: int = Field(description="requests decoded together")
    running: int = Field(description="requests being decoded now")
    queued: int = Field(description="requests waiting for a slot")
    prefix_cache_tokens: int = Field(description="prompt tokens reused from slots' prefix caches so far")


class HealthUnavailable(BaseModel):
    """GET /health while the model is loading or the server is shutting down."""

    status: Literal["loading", "shutting_down"]


class Error(BaseModel):
    """What went wrong (`errors.error_body`)."""

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                                  "rate_limit_error, service_unavailable or server_error")
    param: str | None = Field(description="the request field at fault, dotted (e.g. messages.0.content)")
    code: str | None = Field(description="machine-readable reason, e.g. invalid_value, model_not_found")


class ErrorResponse(BaseModel):
    """The envelope every error is answered with (and a stream's last event when it fails)."""

    error: Error


_REQUEST_MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest]
_RESPONSE_MODELS: list[type[BaseModel]] = [
    ChatCompletion, ChatCompletionChunk, TextCompletion, ModelList, ModelCard,
    Health, HealthUnavailable, ErrorResponse,
]


# ---- pydantic -> JSON schema, as the wire sees it -------------------------------------------------

def _is_any_dict(schema: core_schema.CoreSchema | None) -> bool:
    return (schema is not None and schema.get("type") == "dict"
            and schema.get("keys_schema", {}).get("type") in (None, "str")
            and schema.get("values_schema", {}).get("type") in (None, "any"))


def _is_nullable(json_schema: dict[str, Any]) -> bool:
    return json_schema.get("type") != "null" and {"type": "null"} in json_schema.get("anyOf", [])


def _without_null(json_schema: dict[str, Any]) -> dict[str, Any]:
    rest = [option for option in json_schema["anyOf"] if option != {"type": "null"}]
    kept = {key: value for key, value in json_schema.items() if key not in ("anyOf", "default")}
    return {**kept, **rest[0]} if len(rest) == 1 else {**kept, "anyOf": rest}


class _WireJsonSchema(GenerateJsonSchema):
    """pydantic's generator, made to describe what `model_dump()` really writes."""

    def ser_schema(self, schema):
        # A wrap serializer annotated `-> dict[str, Any]` only filters the model's own fields:
        # describe the fields rather than "any object".
        if schema["type"] == "function-wrap" and _is_any_dict(schema.get("return_schema")):
            return None
        return super().ser_schema(schema)

    def field_is_required(self, field, total):
        if self.mode == "serialization":
            # Responses always carry defaulted fields (model_dump keeps them); null ones are handled below.
            return not field.get("serialization_exclude") and field.get("serialization_exclude_if") is None
        return super().field_is_required(field, total)

    def model_schema(self, schema):
        json_schema = super().model_schema(schema)
        serializer = schema.get("serialization")
        if self.mode == "serialization" and serializer and serializer["type"] == "function-wrap" \
                and _is_any_dict(serializer.get("return_schema")) and not serializer.get("info_arg"):
            self._mark_omitted_nulls(schema["cls"], serializer["function"], json_schema)
        return json_schema

    @staticmethod
    def _mark_omitted_nulls(cls: type[BaseModel], serializer: Any, json_schema: dict[str, Any]) -> None:
        # Ask the serializer itself which keys it drops when their value is None (the handler it wraps
        # returns field names: the routes dump without aliases).
        all_null = {name: None for name in cls.model_fields}
        kept = serializer(cls.model_construct(), lambda _: dict(all_null))
        properties = json_schema.get("properties", {})
        for field_name, info in cls.model_fields.items():
            wire_name = info.serialization_alias or info.alias or field_name
            prop = properties.get(wire_name)
            if field_name in kept or prop is None or not _is_nullable(prop):
                continue
            properties[wire_name] = _without_null(prop)  # present means not null...
            json_schema["required"] = [name for name in json_schema.get("required", []) if name != wire_name]
        if "required" in json_schema and not json_schema["required"]:
            del json_schema["required"]  # ...and absent means null


def _component_schemas() -> dict[str, Any]:
    models = [(model, "validation") for model in _REQUEST_MODELS]
    models += [(model, "serialization") for model in _RESPONSE_MODELS]
    _, top = models_json_schema(models, by_alias=True, ref_template=REF_TEMPLATE, schema_generator=_WireJsonSchema)
    schemas = top["$defs"]
    for rule in _VALIDATOR_RULES:
        rule(schemas)
    _optional_fields_take_null(schemas)
    return dict(sorted(schemas.items()))


def _request_model_names() -> set[str]:
    pending, names = [RequestModel], set()
    while pending:
        for subclass in pending.pop().__subclasses__():
            names.add(subclass.__name__)
            pending.append(subclass)
    return names


def _optional_fields_take_null(schemas: dict[str, Any]) -> None:
    """`RequestModel._null_means_default`: every optional request field also accepts null (= not given)."""
    annotations = ("title", "description", "default")
    for name in _request_model_names() & set(schemas):
        schema = schemas[name]
        required = set(schema.get("required", []))
        for field, prop in schema.get("properties", {}).items():
            if field in required or prop.get("type") == "null" or _NULL in prop.get("anyOf", []):
                continue
            kept = {key: value for key, value in prop.items() if key in annotations}
            rest = {key: value for key, value in prop.items() if key not in annotations}
            schema["properties"][field] = {**kept, "anyOf": [rest, _NULL]}


# ---- what the request validators check, as JSON-schema keywords -----------------------------------

def _property(schemas: dict[str, Any], model: str, field: str) -> dict[str, Any]:
    try:
        return schemas[model]["properties"][field]
    except KeyError:
        raise KeyError(f"openapi: {model}.{field} is gone from schemas.py; update _VALIDATOR_RULES") from None


def _replace(schemas: dict[str, Any], model: str, field: str, new: dict[str, Any]) -> None:
    old = _property(schemas, model, field)
    keep = {key: old[key] for key in ("title", "description") if key in old}
    if "default" in old and (old["default"] is not None or _NULL in new.get("anyOf", [])):
        keep["default"] = old["default"]  # a null default stays only where null is still allowed
    schemas[model]["properties"][field] = {**keep, **new}


_NULL = {"type": "null"}
_NON_EMPTY_ARRAY = {"type": "array", "minItems": 1}


def _sampling_rules(schemas: dict[str, Any]) -> None:
    """GenerationRequest' validators: n == 1, stop strings, logit_bias keys and range."""
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        _replace(schemas, model, "n", {"type": "integer", "const": 1,
                                       "description": "only 1: one choice per request"})
        stop = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARACTERS}
        _replace(schemas, model, "stop", {"anyOf": [stop, {"type": "array", "items": stop, "maxItems": 16}, _NULL],
                                          "description": f"a stop string or up to 16; none may be empty or longer "
                                                         f"than {MAX_STOP_CHARACTERS} characters"})
        _replace(schemas, model, "logit_bias", {
            "anyOf": [{"type": "object", "propertyNames": {"pattern": r"^\s*[0-9]{1,10}\s*$"},
                       "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}, _NULL],
            "description": "token id (a whole number as a string, below the model's vocabulary size) "
                           "-> bias between -100 and 100",
        })


def _chat_rules(schemas: dict[str, Any]) -> None:
    """ChatCompletionRequest's cross-field checks that JSON Schema can state."""
    def given(field: str) -> dict[str, Any]:
        return {"required": [field], "properties": {field: _NON_EMPTY_ARRAY}}

    has_functions = {"anyOf": [given("tools"), given("functions")]}
    chat = schemas["ChatCompletionRequest"]
    _property(schemas, "ChatCompletionRequest", "tool_choice")
    _property(schemas, "ChatCompletionRequest", "function_call")
    chat["allOf"] = [
        {"not": {"allOf": [given("tools"), given("functions")]}},  # either tools or legacy functions
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [{"const": "required"},
                                                                                       {"type": "object"}]}}},
         "then": has_functions},
        {"if": {"required": ["function_call"], "properties": {"function_call": {"type": "object"}}},
         "then": has_functions},
    ]
    chat["description"] = (chat.get("description", "") + "\n\nA named `tool_choice` / `function_call` must name one "
                           "of the request's functions; `response_format.json_schema.strict` needs every object "
                           "schema to list all properties as required with `additionalProperties: false`.").strip()


def _assistant_call_rules(schemas: dict[str, Any]) -> None:
    """ChatMessage: the calls of an assistant turn carry what the chat template renders."""
    # An assistant turn's calls go through the chat template, which needs each call's function name and
    # arguments (legacy `function_call` counts only when there are no `tool_calls`); other roles' are ignored.
    function = {"type": "object", "required": ["name", "arguments"],
                "properties": {"name": {"type": "string"}, "arguments": {"description": "a JSON string or value"}}}
    call = {"type": "object", "required": ["function"], "properties": {"function": function}}
    for field in ("tool_calls", "function_call"):
        generated = json.dumps(_property(schemas, "ChatMessage", field))
        if '"$ref"' in generated or '"properties"' in generated:
            return  # schemas.py types these now: its own schema says what is needed
    calls_given = {"required": ["tool_calls"], "properties": {"tool_calls": _NON_EMPTY_ARRAY}}
    schemas["ChatMessage"]["if"] = {"required": ["role"], "properties": {"role": {"const": "assistant"}}}
    schemas["ChatMessage"]["then"] = {
        "properties": {"tool_calls": {"anyOf": [{"type": "array", "items": call}, _NULL]}},
        "if": calls_given,
        "else": {"properties": {"function_call": {"anyOf": [{"type": "object", "maxProperties": 0}, function, _NULL]}}},
    }


def _message_rules(schemas: dict[str, Any]) -> None:
    """ContentPart: text parts only; FunctionDefinition: parameters describe an object."""
    _replace(schemas, "ContentPart", "type", {"const": "text", "description": "only text parts are accepted"})
    _replace(schemas, "ContentPart", "text", {"type": "string"})
    schemas["ContentPart"]["required"] = ["type", "text"]
    _replace(schemas, "FunctionDefinition", "parameters", {
        "anyOf": [{"type": "object", "additionalProperties": True, "properties": {"type": {"const": "object"}}},
                  _NULL],
        "description": "a JSON schema of type object",
    })
    response_format = schemas["ResponseFormat"]
    _property(schemas, "ResponseFormat", "json_schema")
    response_format["if"] = {"properties": {"type": {"const": "json_schema"}}}
    response_format["then"] = {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}


def _completion_rules(schemas: dict[str, Any]) -> None:
    """CompletionRequest: exactly one non-empty prompt; no suffix (fill-in-the-middle)."""
    prompt = {"type": "string", "minLength": 1}
    _replace(schemas, "CompletionRequest", "prompt", {
        "anyOf": [prompt, {"type": "array", "items": prompt, "minItems": 1, "maxItems": 1}],
        "description": "one non-empty prompt (a string, or a list holding one string)",
    })
    _replace(schemas, "CompletionRequest", "suffix", {
        "anyOf": [{"type": "string", "maxLength": 0}, _NULL],
        "description": "not supported: a non-empty suffix is a 400",
    })


_VALIDATOR_RULES = [_sampling_rules, _chat_rules, _assistant_call_rules, _message_rules, _completion_rules]


# ---- the document ------------------------------------------------------------------------------

def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


_REQUEST_ID = {"$ref": "#/components/headers/X-Request-Id"}


def _response(description: str, content: dict[str, Any] | None = None, **headers: dict[str, Any]) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "headers": {"X-Request-Id": _REQUEST_ID, **{k.replace("_", "-"): v
                                                                            for k, v in headers.items()}}}
    if content is not None:
        response["content"] = content
    return response


def _error(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    return _response(description, _json("ErrorResponse"), **headers)


def _retry_after(description: str) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}}


def _error_responses(max_body_bytes: int | None) -> dict[str, Any]:
    return {
        "BadRequest": _error("Invalid request: a bad field (`param` names it), invalid JSON, an unsupported "
                             "option, or `context_length_exceeded` (decided before any byte is streamed)."),
        "Unauthorized": _error("Missing or wrong API key (only when the server was started with --api-key).",
                               WWW_Authenticate={"required": True, "schema": {"const": "Bearer"}}),
        "NotFound": _error("No such model (`code: model_not_found`)."),
        "MethodNotAllowed": _error("A method this path does not offer (any documented path).",
                                   Allow={"required": True, "schema": {"type": "string"},
                                          "description": "the methods the path offers"}),
        "PayloadTooLarge": _error(f"Request body larger than --max-body-bytes ({max_body_bytes} bytes)."
                                  if max_body_bytes else "Request body larger than --max-body-bytes."),
        "TooManyRequests": _error("The queue is full (--max-queue); retry after `Retry-After` seconds.",
                                  Retry_After=_retry_after("seconds to wait before retrying")),
        "InternalError": _error("Unexpected server failure (`code: internal_error`; the request id is in the "
                                "message and the server's log), or the generation failed."),
        "ServiceUnavailable": _error("The model is still loading (`code: model_loading`) or the server is shutting "
                                     "down (`code: shutting_down`).",
                                     Retry_After=_retry_after("seconds to wait before retrying")),
    }


def _responses(ok: dict[str, Any], *errors: str) -> dict[str, Any]:
    refs = {status: {"$ref": f"#/components/responses/{name}"} for status, name in (
        ("400", "BadRequest"), ("401", "Unauthorized"), ("404", "NotFound"), ("413", "PayloadTooLarge"),
        ("429", "TooManyRequests"), ("500", "InternalError"), ("503", "ServiceUnavailable"))
        if status in errors or status == "500"}
    return {**ok, **refs}


_CHAT_STREAM = """\
Server-sent events, sent when the request has `"stream": true`. Each event is one line
`data: <JSON>` followed by a blank line:

1. a role chunk: a `ChatCompletionChunk` whose delta is `{"role": "assistant", "content": ""}`;
2. content deltas (`delta.content`) and tool-call deltas (`delta.tool_calls`: a call's first delta has
   `index`, `id`, `type`, `function.name` and `arguments: ""`, later ones `index` and argument
   fragments; legacy `functions` requests get `delta.function_call` instead);
3. a final chunk with `delta: {}` and `finish_reason`;
4. when `stream_options.include_usage` is set, a chunk with `choices: []` and `usage`;
5. `data: [DONE]`.

Every chunk validates against `#/components/schemas/ChatCompletionChunk`. SSE comments (`: ping`) keep a
quiet stream alive. A generation that fails after the stream began ends with one
`data: {"error": {...}}` event (`#/components/schemas/ErrorResponse`) and no `[DONE]`."""

_COMPLETION_STREAM = """\
Server-sent events, sent when the request has `"stream": true`: `data: <JSON>` events each holding a
`TextCompletion` chunk (the echoed prompt first when `echo` is set, then text deltas, then a chunk with
empty `text` and `finish_reason`, then a usage chunk with `choices: []` when
`stream_options.include_usage` is set), then `data: [DONE]`. Comments (`: ping`) keep a quiet stream
alive; a failure after the stream began ends it with a `data: {"error": {...}}` event and no `[DONE]`."""


def _event_stream(description: str, chunk: str) -> dict[str, Any]:
    # The schema describes one event, as parsed by an SSE client ({"event", "data"}): the reading tools
    # take for OpenAPI < 3.2 (3.2 calls this `itemSchema`). `data` is `[DONE]` or JSON: a chunk or the error.
    return {"text/event-stream": {"schema": {
        "type": "object",
        "description": description,
        "required": ["data"],
        "properties": {
            "event": {"const": "message", "description": "no `event:` field is sent, so every event is a message"},
            "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [_ref(chunk), _ref("ErrorResponse")]}},
            ]},
        },
    }}}


_CHAT_EXAMPLES = {
    "simple": {"summary": "one user turn", "value": {
        "model": "qwen", "max_tokens": 16, "messages": [{"role": "user", "content": "Hello!"}]}},
    "stream": {"summary": "streamed, with usage", "value": {
        "model": "qwen", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to 3"}]}},
    "tools": {"summary": "function calling", "value": {
        "model": "qwen", "max_tokens": 32, "tool_choice": "auto",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]}},
    "json_schema": {"summary": "structured output", "value": {
        "max_tokens": 32, "messages": [{"role": "user", "content": "A city as JSON"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "city", "strict": True, "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
            "additionalProperties": False}}}}},
}

_COMPLETION_EXAMPLES = {
    "simple": {"summary": "a prompt", "value": {"model": "qwen", "prompt": "Once upon a time", "max_tokens": 16}},
}


def _paths(security: list[dict[str, list[str]]], *, metrics_need_key: bool) -> dict[str, Any]:
    json_ok = lambda name, what: {"200": _response(what, _json(name))}  # noqa: E731
    v1 = ("401", "503")
    return {
        "/": {"get": {
            "operationId": "chatPage", "tags": ["page"], "summary": "The chat page (self-contained HTML)",
            "parameters": [{"name": "If-None-Match", "in": "header", "required": False, "schema": {"type": "string"}}],
            "responses": _responses({
                "200": _response("The page.", {"text/html": {"schema": {"type": "string"}}},
                                 ETag={"required": True, "schema": {"type": "string"}}),
                "304": _response("Not modified (the `If-None-Match` ETag is current).",
                                 ETag={"required": True, "schema": {"type": "string"}}),
            }),
        }},
        "/health": {"get": {
            "operationId": "health", "tags": ["operations"], "summary": "Readiness and load",
            "responses": {
                **json_ok("Health", "The model is loaded."),
                "503": _response("Loading or shutting down.", _json("HealthUnavailable")),
                "500": {"$ref": "#/components/responses/InternalError"},
            },
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "tags": ["operations"], "summary": "Prometheus metrics (text exposition)",
            **({"security": copy.deepcopy(security)} if metrics_need_key else {}),
            "responses": _responses({"200": _response("Metrics.", {"text/plain": {"schema": {"type": "string"}}})},
                                    *(("401",) if metrics_need_key else ())),
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "tags": ["operations"], "summary": "This document",
            "responses": _responses({"200": _response("OpenAPI 3.1 document.", {"application/json": {
                "schema": {"type": "object", "required": ["openapi", "info", "paths"]}}})}),
        }},
        "/v1/models": {"get": {
            "operationId": "listModels", "tags": ["models"], "summary": "The served model",
            "security": copy.deepcopy(security),
            "responses": _responses(json_ok("ModelList", "The one served model."), *v1),
        }},
        "/v1/models/{model_id}": {"get": {
            "operationId": "getModel", "tags": ["models"], "summary": "One model by id",
            "security": copy.deepcopy(security),
            "parameters": [{"name": "model_id", "in": "path", "required": True,
                            "description": "the served model's id (--model-alias); may contain '/'",
                            "schema": {"type": "string", "minLength": 1}}],
            "responses": _responses(json_ok("ModelCard", "The model."), "404", *v1),
        }},
        "/v1/chat/completions": {"post": {
            "operationId": "createChatCompletion", "tags": ["generation"], "summary": "Chat completion",
            "security": copy.deepcopy(security),
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("ChatCompletionRequest"), "examples": _CHAT_EXAMPLES}}},
            "responses": _responses({"200": _response(
                "The answer: `application/json` (`chat.completion`), or `text/event-stream` when `stream` is true.",
                {**_json("ChatCompletion"), **_event_stream(_CHAT_STREAM, "ChatCompletionChunk")})},
                "400", "413", "429", *v1),
        }},
        "/v1/completions": {"post": {
            "operationId": "createCompletion", "tags": ["generation"], "summary": "Legacy prompt completion",
            "security": copy.deepcopy(security),
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("CompletionRequest"), "examples": _COMPLETION_EXAMPLES}}},
            "responses": _responses({"200": _response(
                "The answer: `application/json` (`text_completion`), or `text/event-stream` when `stream` is true.",
                {**_json("TextCompletion"), **_event_stream(_COMPLETION_STREAM, "TextCompletion")})},
                "400", "413", "429", *v1),
        }},
    }


def build_document(*, api_key_required: bool = False, metrics_public: bool = False,
                   max_body_bytes: int | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh dict; the app caches its JSON)."""
    security = [{"bearer": []}] if api_key_required else [{}, {"bearer": []}]
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "edge-server",
            "version": __version__,
            "summary": "OpenAI-compatible chat server for GGUF Qwen models",
            "description": "Chat and legacy completions, streamed (server-sent events) or not, function "
                           "calling and structured output, on one local model. Unknown request fields are "
                           "ignored. Every error is `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": "generation"}, {"name": "models"}, {"name": "operations"}, {"name": "page"}],
        "paths": _paths(security, metrics_need_key=api_key_required and not metrics_public),
        "components": {
            "schemas": _component_schemas(),
            "responses": _error_responses(max_body_bytes),
            "headers": {"X-Request-Id": {
                "description": "the request's id (the client's X-Request-Id when it sent one), also in the log",
                "required": True, "schema": {"type": "string"}}},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "`Authorization: Bearer <key>` on /v1/* and /metrics, required only when the "
                               "server was started with --api-key / --api-key-file (/metrics not with "
                               "--metrics-public)"}},
        },
    }


def document_for(app: Flask) -> bytes:
    """`app`'s document as JSON bytes, built on first use and cached in the app."""
    cached = app.extensions.get(_CACHE_KEY)
    if cached is None:
        settings = state_of(app).settings
        document = build_document(api_key_required=settings.api_key is not None,
                                  metrics_public=settings.metrics_public, max_body_bytes=app.config.get("MAX_CONTENT_LENGTH"))
        cached = app.extensions[_CACHE_KEY] = json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")
    return cached


@spec.get("/openapi.json")
def openapi_json() -> Response:
    """This server's OpenAPI document."""
    return Response(document_for(current_app._get_current_object()), mimetype="application/json")
