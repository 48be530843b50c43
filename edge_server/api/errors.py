"""Typed API errors and the one OpenAI error envelope every failure is answered with."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from edge_server.api.observability import log_safe
from edge_server.dialects.schemalimits import SchemaRefused
from edge_server.engine.types import BACKEND_FAILED, ENGINE_STOPPED, KV_CACHE_FULL, SHUTTING_DOWN, QueueFull
from edge_server.generation.prompt import TemplateRefused

log = logging.getLogger("edge_server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    """Return the OpenAI error envelope `{"error": {message, type, param, code}}`."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class APIError(Exception):
    """An error the client caused or must know about, answered with the error envelope."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict:
        """The envelope for this error."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


# The one place where a failure becomes an HTTP status: codes of failed generations...
_STATUS_BY_GENERATION_CODE = {SHUTTING_DOWN: 503, ENGINE_STOPPED: 503, KV_CACHE_FULL: 503, BACKEND_FAILED: 503}


def generation_failure(message: str, code: str | None) -> APIError:
    """The error for a generation the engine ended with `code` (whole answers raise it, streams send its body)."""
    status = _STATUS_BY_GENERATION_CODE.get(code, 500)
    return APIError(message, status=status, type="server_error", code=code,
                    headers={"Retry-After": "5"} if status == 503 else None)


def register_error_handlers(app: Flask) -> None:
    """Answer every error, expected or not, with the envelope."""

    # ...and the refusals of the rooms below, which know nothing of HTTP.
    @app.errorhandler(SchemaRefused)
    def _schema_refused(error: SchemaRefused):
        return _api_error(APIError(error.message, param=error.param, code=error.code))

    @app.errorhandler(TemplateRefused)
    def _template_refused(error: TemplateRefused):
        return _api_error(APIError(str(error), param="messages", code="invalid_messages"))

    @app.errorhandler(QueueFull)
    def _queue_full(error: QueueFull):
        return _api_error(APIError("The server is busy: too many requests are waiting. Retry shortly.", status=429,
                                   code="queue_full", headers={"Retry-After": "1"}))

    @app.errorhandler(APIError)
    def _api_error(error: APIError):
        response = jsonify(error.body())
        response.status_code = error.status
        response.headers.update(error.headers)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException):
        status = error.code or 500
        messages = {
            404: f"Unknown route {request.method} {request.path}.",
            405: f"Method {request.method} is not allowed on {request.path}.",
            413: "Request body too large "
            f"(limit {app.config.get('MAX_CONTENT_LENGTH') or 0} bytes).",
        }
        message = messages.get(status, error.description or error.name)
        response = jsonify(error_body(message, type=_TYPE_BY_STATUS.get(status, "invalid_request_error"), code=None))
        response.status_code = status
        if status == 405 and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        request_id = getattr(g, "request_id", "-")
        log.exception("unhandled error in %s %s (request %s)", request.method, log_safe(request.path), request_id)
        response = jsonify(
            error_body(f"Internal server error (request id {request_id}).", type="server_error", code="internal_error")
        )
        response.status_code = 500
        return response
