"""`GET /openapi.json`: the API described from the routes' declarations (`declaration.py`), OpenAPI 3.1.

Each operation comes from its view's `@documented(...)` and the url map; the component schemas are
pydantic's: request bodies in validation mode, responses in serialization mode, both with wire names.
What the request validators check is stated next to them in `schemas.py` (`json_schema_extra`), and
tests/unit/test_openapi.py checks that the server rejects what the document rejects and accepts what
it accepts. Two things the generator adds, each derived from the models:

- Optional request fields also take null (`RequestModel._null_means_default` reads it as not given).
- The response models' custom serializers (`_Sparse`, `_UsageWhenSet`) leave out keys whose value is
  null. The serializer is annotated `-> dict[str, Any]`, which pydantic would document as "any object";
  `_WireJsonSchema` documents the fields instead and asks each serializer which null keys it drops.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from flask import Blueprint, Flask, Response, current_app
from pydantic import BaseModel, Field
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core import core_schema

from edge_server import __version__
from edge_server.api.declaration import Declaration, Reply, declaration_of, documented
from edge_server.api.schemas import RequestModel
from edge_server.api.security import PROTECTED_PREFIX, needs_key
from edge_server.api.state import state_of
from edge_server.settings import Settings

spec = Blueprint("openapi", __name__)

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
_CACHE_KEY = "edge_server_openapi"


# ---- small response bodies that have no pydantic model elsewhere -------------------------------

class ModelStatus(BaseModel):
    """One configured model in GET /health."""

    id: str
    role: Literal["chat", "embedding"]
    state: Literal["unloaded", "loading", "ready", "failed"]
    error: str | None = Field(description="why the last load failed (null when it did not)")


class DeviceShare(BaseModel):
    """One device holding part of the model, in GET /health and /v1/models `meta.devices`."""

    device: str = Field(description="llama.cpp's device name: CPU, CUDA0, Metal, RPC0, ...")
    endpoint: str | None = Field(description="HOST:PORT of the edge-server worker (RPC devices only)")
    layers: int = Field(description="repeating layers placed on it")
    weights_mib: float
    kv_cache_mib: float


class CheckpointFigures(BaseModel):
    """Context checkpoints over the models in memory."""

    count: int = Field(description="checkpoints held")
    bytes: int = Field(description="bytes they hold")
    saved: int = Field(description="checkpoints taken since start")
    restored: int = Field(description="prompts resumed from a checkpoint since start")
    misses: int = Field(description="prompts evaluated from the start although a slot held part of them: no "
                                    "checkpoint at or before where they diverged")


class Health(BaseModel):
    """GET /health once the server has started (the figures are the default model's, or of another model in
    memory while the default is unloaded; null when none is)."""

    status: Literal["ok"]
    model: str = Field(description="the default model's id")
    demo: bool = Field(description="true when serving the generated demo model")
    backend: str | None = Field(description="llama.cpp backend, e.g. CPU, CUDA, Metal")
    gpu_layers: int | None = Field(description="layers offloaded to the GPU")
    devices: list[DeviceShare] = Field(description="what each device holds of the model (layers, weights, KV cache), "
                                                   "as llama.cpp placed them: local ones and --rpc workers")
    n_ctx: int | None = Field(description="tokens per request, prompt + completion")
    threads: int | None = Field(description="the most threads decoding may use (--threads)")
    threads_in_use: int | None = Field(description="threads decoding uses now: fewer while fewer run faster, "
                                                   "e.g. beside another busy process (unless --fixed-threads)")
    parallel: int | None = Field(description="requests decoded together")
    running: int = Field(description="requests being decoded now, over every model")
    queued: int = Field(description="requests waiting for a slot, over every model")
    prefix_cache_tokens: int = Field(description="prompt tokens reused from slots' prefix caches so far")
    ctx_checkpoints: CheckpointFigures = Field(description="context checkpoints of the models in memory (models whose "
                                                           "memory cannot drop a suffix: recurrent, hybrid, small "
                                                           "sliding window)")
    models: list[ModelStatus] = Field(description="every configured model, the default first")


class HealthUnavailable(BaseModel):
    """GET /health while the model is loading, the server is shutting down, or the backend failed (it exits next)."""

    status: Literal["loading", "shutting_down", "failed"]
    error: str | None = Field(None, exclude_if=lambda value: value is None,
                              description="what failed (status failed only): e.g. an RPC worker was lost")


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


# ---- pydantic -> JSON schema, as the wire sees it -------------------------------------------------

_NULL = {"type": "null"}


def _is_any_dict(schema: core_schema.CoreSchema | None) -> bool:
    return (schema is not None and schema.get("type") == "dict"
            and schema.get("keys_schema", {}).get("type") in (None, "str")
            and schema.get("values_schema", {}).get("type") in (None, "any"))


def _is_nullable(json_schema: dict[str, Any]) -> bool:
    return json_schema.get("type") != "null" and _NULL in json_schema.get("anyOf", [])


def _without_null(json_schema: dict[str, Any]) -> dict[str, Any]:
    rest = [option for option in json_schema["anyOf"] if option != _NULL]
    kept = {key: value for key, value in json_schema.items() if key not in ("anyOf", "default")}
    return {**kept, **rest[0]} if len(rest) == 1 else {**kept, "anyOf": rest}


class _WireJsonSchema(GenerateJsonSchema):
    """pydantic's generator, made to describe what the server accepts and what `model_dump()` writes."""

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
        if self.mode == "validation" and issubclass(schema["cls"], RequestModel):
            self._optional_fields_take_null(json_schema)
        elif self.mode == "serialization" and serializer and serializer["type"] == "function-wrap" \
                and _is_any_dict(serializer.get("return_schema")) and not serializer.get("info_arg"):
            self._mark_omitted_nulls(schema["cls"], serializer["function"], json_schema)
        return json_schema

    @staticmethod
    def _optional_fields_take_null(json_schema: dict[str, Any]) -> None:
        required = set(json_schema.get("required", []))
        for name, prop in json_schema.get("properties", {}).items():
            if name in required or prop.get("type") == "null" or _NULL in prop.get("anyOf", []):
                continue
            kept = {key: value for key, value in prop.items() if key in ("title", "description", "default")}
            rest = {key: value for key, value in prop.items() if key not in kept}
            json_schema["properties"][name] = {**kept, "anyOf": [rest, _NULL]}

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


def _component_schemas(declarations: list[Declaration]) -> tuple[dict[type[BaseModel], dict[str, str]], dict[str, Any]]:
    """`$ref`s of the declared models, and the component schemas (theirs and everything they use)."""
    models = {(ErrorResponse, "serialization"): None}
    for declaration in declarations:
        if declaration.body is not None:
            models[(declaration.body, "validation")] = None
        for reply in declaration.responses.values():
            for model in (reply.json, reply.stream):
                if isinstance(model, type):
                    models[(model, "serialization")] = None
    refs, top = models_json_schema(list(models), by_alias=True, ref_template=REF_TEMPLATE,
                                   schema_generator=_WireJsonSchema)
    return {model: ref for (model, _), ref in refs.items()}, dict(sorted(top["$defs"].items()))


# ---- operations, from the declarations ----------------------------------------------------------

_RETRY_AFTER = {"description": "seconds to wait before retrying", "required": True,
                "schema": {"type": "string", "pattern": "^[0-9]+$"}}

# The error-envelope responses (components/responses), by status: name, description, headers.
_ERRORS: dict[int, tuple[str, str, dict[str, Any]]] = {
    400: ("BadRequest", "Invalid request: a bad field (`param` names it), invalid JSON, an unsupported option, or "
                        "`context_length_exceeded` (decided before any byte is streamed).", {}),
    401: ("Unauthorized", "Missing or wrong API key (only when the server was started with --api-key).",
          {"WWW-Authenticate": {"required": True, "schema": {"const": "Bearer"}}}),
    404: ("NotFound", "No such model (`code: model_not_found`).", {}),
    405: ("MethodNotAllowed", "A method this path does not offer (any documented path).",
          {"Allow": {"required": True, "schema": {"type": "string"}, "description": "the methods the path offers"}}),
    413: ("PayloadTooLarge", "Request body larger than --max-body-bytes{limit}.", {}),
    429: ("TooManyRequests", "The queue is full (--max-queue); retry after `Retry-After` seconds.",
          {"Retry-After": _RETRY_AFTER}),
    500: ("InternalError", "Unexpected server failure (`code: internal_error`; the request id is in the message "
                           "and the server's log), or the generation failed.", {}),
    503: ("ServiceUnavailable", "The model is still loading (`code: model_loading`) or the server is shutting "
                                "down (`code: shutting_down`).", {"Retry-After": _RETRY_AFTER}),
}

_STREAM = """\
Server-sent events, sent when the request has `"stream": true`. Each event is one line
`data: <JSON>` followed by a blank line:

{events}

Every chunk validates against `{chunk}`. SSE comments (`: ping`) keep a quiet stream alive.
A generation that fails after the stream began ends with one `data: {{"error": {{...}}}}` event
(`{error}`) and no `[DONE]`."""


def _response(description: str, content: dict[str, Any] | None = None,
              headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "headers": {
        "X-Request-Id": {"$ref": "#/components/headers/X-Request-Id"}, **(headers or {})}}
    if content:
        response["content"] = content
    return response


def _event_stream(reply: Reply, refs: dict[type[BaseModel], dict[str, str]]) -> dict[str, Any]:
    # The schema describes one event, as parsed by an SSE client ({"event", "data"}): the reading tools
    # take for OpenAPI < 3.2 (3.2 calls this `itemSchema`). `data` is `[DONE]` or JSON: a chunk or the error.
    chunk, error = refs[reply.stream], refs[ErrorResponse]
    return {"schema": {
        "type": "object",
        "description": _STREAM.format(events=reply.events, chunk=chunk["$ref"], error=error["$ref"]),
        "required": ["data"],
        "properties": {
            "event": {"const": "message", "description": "no `event:` field is sent, so every event is a message"},
            "data": {"anyOf": [
                {"const": "[DONE]"},
                {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [chunk, error]}},
            ]},
        },
    }}


def _reply(reply: Reply, refs: dict[type[BaseModel], dict[str, str]]) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if reply.json is not None:
        content["application/json"] = {"schema": reply.json if isinstance(reply.json, dict) else refs[reply.json]}
    if reply.stream is not None:
        content["text/event-stream"] = _event_stream(reply, refs)
    if reply.media is not None:
        content[reply.media] = {"schema": reply.media_schema or {"type": "string"}}
    return _response(reply.description, content,
                     {name: {"required": True, "schema": {"type": "string"}} for name in reply.headers})


def _parameter(name: str, description: str, in_path: bool) -> dict[str, Any]:
    if in_path:
        return {"name": name, "in": "path", "required": True, "description": description,
                "schema": {"type": "string", "minLength": 1}}
    return {"name": name, "in": "header", "required": False, "description": description, "schema": {"type": "string"}}


def _security(path: str, settings: Settings) -> list[dict[str, list[str]]] | None:
    """As `security.py` enforces it: /v1/* takes an optional bearer key, required once the server has one
    (and then /metrics needs it too, unless --metrics-public)."""
    if settings.api_key is not None:
        return [{"bearer": []}] if needs_key(path, settings) else None
    return [{}, {"bearer": []}] if path.startswith(PROTECTED_PREFIX) else None


def _operation(declaration: Declaration, path_arguments: set[str], security: list[dict[str, list[str]]] | None,
               refs: dict[type[BaseModel], dict[str, str]]) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": declaration.operation_id, "tags": [declaration.tag],
                                 "summary": declaration.summary}
    errors = {500, *declaration.errors}
    if security:
        operation["security"] = security
        errors.add(401)
    if declaration.params:
        operation["parameters"] = [_parameter(name, description, name in path_arguments)
                                   for name, description in declaration.params.items()]
    if declaration.body is not None:
        errors |= {400, 413}
        media = {"schema": refs[declaration.body], **({"examples": declaration.examples} if declaration.examples else {})}
        operation["requestBody"] = {"required": True, "content": {"application/json": media}}
    responses = {str(status): _reply(reply, refs) for status, reply in declaration.responses.items()}
    operation["responses"] = {**responses, **{str(status): {"$ref": f"#/components/responses/{_ERRORS[status][0]}"}
                                              for status in sorted(errors) if str(status) not in responses}}
    return operation


def _flask_path(rule: str) -> str:
    """`/v1/models/<path:model_id>` -> `/v1/models/{model_id}`."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule)


def _paths(app: Flask, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every route of `app` (Flask's own static files aside) as an operation, and the component schemas."""
    routes = [(_flask_path(rule.rule), method.lower(), rule.arguments,
               declaration_of(app.view_functions[rule.endpoint], rule.endpoint))
              for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    refs, schemas = _component_schemas([declaration for *_, declaration in routes])
    paths: dict[str, Any] = {}
    for path, method, arguments, declaration in sorted(routes, key=lambda route: route[:2]):
        paths.setdefault(path, {})[method] = _operation(declaration, arguments, _security(path, settings), refs)
    return paths, schemas


def build_document(*, app: Flask) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app` (a fresh dict; the app caches its JSON)."""
    paths, schemas = _paths(app, state_of(app).settings)
    max_body_bytes = app.config.get("MAX_CONTENT_LENGTH")
    limit = f" ({max_body_bytes} bytes)" if max_body_bytes else ""
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
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {name: _response(description.format(limit=limit), {"application/json": {
                "schema": {"$ref": REF_TEMPLATE.format(model="ErrorResponse")}}}, headers)
                for name, description, headers in _ERRORS.values()},
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
        document = build_document(app=app)
        cached = app.extensions[_CACHE_KEY] = json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8")
    return cached


@spec.get("/openapi.json")
@documented("openapi", "operations", "This document", {200: Reply("OpenAPI 3.1 document.", json={
    "type": "object", "required": ["openapi", "info", "paths"]})})
def openapi_json() -> Response:
    """This server's OpenAPI document."""
    return Response(document_for(current_app._get_current_object()), mimetype="application/json")
