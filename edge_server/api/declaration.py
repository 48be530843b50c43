"""What a route says about itself for the OpenAPI document: one `@documented(...)` under its `@bp.get/post`.

`api/openapi.py` walks Flask's url map and builds each operation from its view's declaration; a view
without one cannot be documented, so the document (and tests/unit/test_openapi.py) fails. What a route
need not declare is derived: its path and path parameters (the rule), security and 401 (`security.py`),
400 and 413 (a request body), 500 (every route).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel

View = TypeVar("View", bound=Callable[..., Any])


@dataclass(frozen=True)
class Reply:
    """One documented response: a JSON body (a pydantic model, or a literal JSON schema), an event stream
    of `stream` chunks (`events` says what it sends, in order), or media type `media` (a string, unless
    `media_schema` says more, e.g. the events of a stream with named events)."""

    description: str
    json: type[BaseModel] | dict[str, Any] | None = None
    stream: type[BaseModel] | None = None
    events: str = ""
    media: str | None = None
    media_schema: dict[str, Any] | None = None
    headers: tuple[str, ...] = ()  # required string headers besides X-Request-Id (e.g. ETag)


@dataclass(frozen=True)
class Declaration:
    """One operation: its id, tag and summary, request body, responses and envelope errors."""

    operation_id: str
    tag: str
    summary: str
    responses: dict[int, Reply]
    body: type[BaseModel] | None = None
    examples: dict[str, Any] = field(default_factory=dict)
    errors: tuple[int, ...] = ()  # error-envelope statuses the view itself raises (404, 429, 503...)
    params: dict[str, str] = field(default_factory=dict)  # path or (optional) header parameter -> description


def documented(operation_id: str, tag: str, summary: str, responses: dict[int, Reply], **more: Any) -> Callable[[View], View]:
    """Declare a view's operation (see `Declaration`); put it below the route decorator."""
    declaration = Declaration(operation_id, tag, summary, responses, **more)

    def declare(view: View) -> View:
        view.openapi = declaration  # type: ignore[attr-defined]
        return view

    return declare


def declaration_of(view: Callable[..., Any], endpoint: str) -> Declaration:
    """The view's declaration; a LookupError naming the endpoint when it has none."""
    declaration = getattr(view, "openapi", None)
    if not isinstance(declaration, Declaration):
        raise LookupError(f"openapi: the view of endpoint {endpoint!r} has no @documented(...) declaration")
    return declaration
