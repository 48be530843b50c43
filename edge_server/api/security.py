"""What keeps an edge server on someone's laptop safe: API key, CORS allowlist, bind warnings."""

from __future__ import annotations

import hmac
import logging

from flask import Flask, Response, request

from edge_server.api.errors import APIError
from edge_server.settings import Settings, is_loopback

log = logging.getLogger("edge_server")
PROTECTED_PREFIX = "/v1/"
METRICS_PATH = "/metrics"
TOKEN_PATHS = frozenset({"/tokenize", "/detokenize"})  # llama-server's paths, outside /v1/ but the API all the same


def register_security(app: Flask, settings: Settings) -> None:
    """Bearer (or x-api-key) auth on /v1/* (when a key is set) and CORS for the allowed origins (off by default)."""
    origins = set(settings.cors_origin)

    @app.before_request
    def _preflight_then_auth():
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return Response(status=204)  # answered before auth: browsers send no credentials here
        if settings.api_key is not None and needs_key(request.path, settings):
            if not has_key(settings.api_key):
                raise APIError("Missing or wrong API key: send 'Authorization: Bearer <key>' "
                               "(or Anthropic's 'x-api-key: <key>').", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    @app.after_request
    def _cors_headers(response: Response) -> Response:
        origin = request.headers.get("Origin", "").rstrip("/")
        if origin and ("*" in origins or origin in origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = ("Authorization, Content-Type, X-Api-Key, "
                                                                "Anthropic-Version, Anthropic-Beta")
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
            response.headers["Access-Control-Max-Age"] = "600"
            response.vary.add("Origin")
        return response


def has_key(api_key: str) -> bool:
    """Whether the request carries `api_key`: as a bearer token, or in Anthropic's `x-api-key` header."""
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    given = bearer.strip() if scheme.lower() == "bearer" else request.headers.get("X-Api-Key", "").strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


def needs_key(path: str, settings: Settings) -> bool:
    """Whether a request to `path` must carry the API key, once the server has one."""
    # /metrics tells request, token and queue figures: private with the API, unless asked otherwise.
    return (path.startswith(PROTECTED_PREFIX) or path in TOKEN_PATHS
            or (path == METRICS_PATH and not settings.metrics_public))


def warn_if_exposed(settings: Settings) -> None:
    """Log a warning when the server listens beyond this machine with no API key."""
    if settings.api_key is None and not is_loopback(settings.host):
        log.warning("listening on %s without an API key: anyone who can reach this machine can use the model "
                    "(set --api-key or EDGE_API_KEY, or bind --host 127.0.0.1)", settings.host)

