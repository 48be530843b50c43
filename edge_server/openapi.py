"""`GET /openapi.json`: the API described from the pydantic schemas (OpenAPI 3.1)."""

from __future__ import annotations

from flask import Blueprint

spec = Blueprint("openapi", __name__)
