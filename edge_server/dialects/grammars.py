"""llama.cpp grammars (GBNF) for forced tool calls and JSON output, built by llama-cpp-python's converter.

Every schema is checked against `schemalimits` first; conversions are cached by their inputs.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from llama_cpp import llama_grammar
from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

from edge_server.api.errors import APIError
from edge_server.dialects.schemalimits import check_schema_limits
from edge_server.dialects.hermes import CLOSE_TAG, OPEN_TAG


def _native_repetition(item_rule: str, min_items: int, max_items: int | None, separator_rule: str | None = None,
                       item_rule_is_literal: bool = False) -> str:
    """llama.cpp's own converter's `build_repetition` (common/json-schema-to-grammar.cpp): GBNF `x{m,n}`."""
    if max_items == 0:
        return ""
    if min_items == 0 and max_items == 1:
        return f"{item_rule}?"
    if not separator_rule:
        if max_items is None:
            return f"{item_rule}+" if min_items == 1 else f"{item_rule}{{{min_items},}}"
        return f"{item_rule}{{{min_items},{max_items}}}"
    rest = _native_repetition(f"({separator_rule} {item_rule})", max(min_items - 1, 0),
                              None if max_items is None else max_items - 1)
    return f"({item_rule} {rest})?" if min_items == 0 else f"{item_rule} {rest}"


# The Python port in llama-cpp-python writes `x{0,n}` as n nested groups `(x (x (...)?)?)?`, and
# llama.cpp parses nested groups recursively: a schema asking for 20,000 repetitions overflowed the
# thread's stack and killed the process. The C++ converter that llama.cpp itself ships writes the
# flat `x{m,n}` form, which the parser expands iteratively; use that form in the Python port too.
llama_grammar._build_repetition = _native_repetition


def schema_grammar(schema: dict[str, Any], *, param: str) -> str:
    """GBNF that admits exactly the JSON values `schema` describes; a 400 if it is too large or unconvertible."""
    return _grammar([("", schema, param)])


def any_json_object_grammar() -> str:
    """GBNF for any JSON object (`response_format: json_object`)."""
    return JSON_GBNF


def tool_call_grammar(functions: list[tuple[str, dict[str, Any] | None]], *, several: bool, param: str,
                      answer: tuple[dict[str, Any], str] | None = None) -> str:
    """GBNF for Qwen tool-call blocks calling one of `functions` (name, parameters schema).

    With `answer` (a schema and the request field it came from), the output may instead be one JSON
    value of that schema: tools offered in `auto` mode beside a structured answer give a call or the
    answer, never an answer forced into the schema with no way to call.
    """
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for name, parameters in functions
    ]
    call_schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    named = [("tool-call-json", call_schema, param)] + ([("answer-json", *answer)] if answer else [])
    rules = _grammar(named, prop_order=("name", "arguments"))
    block = f'{json.dumps(OPEN_TAG + chr(10))} tool-call-json {json.dumps(chr(10) + CLOSE_TAG)}'
    calls = 'tool-call-block ("\\n" tool-call-block)*' if several else "tool-call-block"
    root = f"root ::= {calls} | answer-json" if answer else f"root ::= {calls}"
    return f"{root}\ntool-call-block ::= {block}\n{rules}"


def _grammar(named_schemas: list[tuple[str, dict[str, Any], str]], *, prop_order: tuple[str, ...] = ()) -> str:
    """Rules for each (rule name, schema, request field) in one converter; "" names the root."""
    for _, schema, param in named_schemas:
        check_schema_limits(schema, param=param)
    # Property order matters (it is the order the output must follow): no sort_keys in the cache key.
    key = json.dumps([(name, schema) for name, schema, _ in named_schemas])
    try:
        return _convert(key, prop_order)
    except Exception as error:  # the converter raises many types (KeyError, ValueError, AssertionError...)
        raise APIError(f"Cannot constrain output to this JSON schema: {type(error).__name__}: {error}",
                       param=named_schemas[0][2], code="unsupported_schema") from None


@functools.lru_cache(maxsize=64)
def _convert(named_schemas_json: str, prop_order: tuple[str, ...]) -> str:
    # Keyed by the schemas' canonical JSON: a client that repeats its tools or format pays once.
    converter = SchemaConverter(prop_order={name: i for i, name in enumerate(prop_order)}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    for name, schema in json.loads(named_schemas_json):
        converter.visit(converter.resolve_refs(schema, "stdin"), name)
    return converter.format_grammar()
