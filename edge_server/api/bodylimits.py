"""Bounds on the shape of a decoded JSON body, checked before validation touches it (pure).

Validation, rendering and tokenizing cost time and memory in proportion to what a client sends;
these checks run in one cheap pass first, so that a hostile body gets its 400 in milliseconds.
"""

from __future__ import annotations

import re
from typing import Any

from edge_server.api.errors import APIError

MAX_JSON_DEPTH = 64  # nested arrays and objects
MAX_ARRAY_ITEMS = 10_000  # elements of any one array, keys of any one object
MAX_JSON_VALUES = 200_000  # values in the whole body
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_body_shape(body: Any) -> None:
    """Raise a 400 `APIError` naming the place when `body` nests too deep, holds too many values,
    has an array or object that is too large, or a string with a lone surrogate (text that is not Unicode)."""
    pending: list[tuple[Any, int, tuple[str | int, ...]]] = [(body, 1, ())]
    values = 1
    while pending:
        value, depth, path = pending.pop()
        if isinstance(value, str):
            _check_text(value, path)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            _refuse(f"Request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.", path)
        if len(value) > MAX_ARRAY_ITEMS:
            kind, unit = ("An array", "elements") if isinstance(value, list) else ("An object", "keys")
            _refuse(f"{kind} has {len(value)} {unit}; at most {MAX_ARRAY_ITEMS} are accepted.", path)
        values += len(value)  # counted before queuing: the walk never holds more than the limit
        if values > MAX_JSON_VALUES:
            _refuse(f"Request body holds more than {MAX_JSON_VALUES} JSON values.", ())
        if isinstance(value, list):
            pending.extend((item, depth + 1, (*path, i)) for i, item in enumerate(value))
        else:
            for key, item in value.items():
                _check_text(key, path)
                pending.append((item, depth + 1, (*path, key)))


def nesting_error() -> APIError:
    """The 400 for a body too deeply nested for the JSON decoder itself."""
    return APIError(f"Request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep.",
                    code="invalid_json")


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    if not text.isascii() and (match := _LONE_SURROGATE.search(text)):
        _refuse(f"Text contains a lone surrogate (\\u{ord(match.group()):04x}), which is not valid Unicode; "
                f"encode characters outside the Basic Multilingual Plane as surrogate pairs.", path)


def _refuse(message: str, path: tuple[str | int, ...]) -> None:
    param = ".".join(str(part) for part in path) or None
    raise APIError(message, param=param, code="invalid_value")
