"""llama.cpp grammars (GBNF) for forced tool calls and JSON output, built by llama-cpp-python's converter."""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from .errors import APIError
from .toolcalls import CLOSE_TAG, OPEN_TAG


def schema_grammar(schema: dict[str, Any], *, param: str, prop_order: list[str] | None = None) -> str:
    """GBNF that admits exactly the JSON values `schema` describes; a 400 if the converter cannot."""
    try:
        return json_schema_to_gbnf(json.dumps(schema), prop_order)
    except Exception as error:  # the converter raises many types (KeyError, ValueError, AssertionError...)
        raise APIError(f"Cannot constrain output to this JSON schema: {type(error).__name__}: {error}",
                       param=param, code="unsupported_schema") from None


def any_json_object_grammar() -> str:
    """GBNF for any JSON object (`response_format: json_object`)."""
    return JSON_GBNF


def tool_call_grammar(functions: list[tuple[str, dict[str, Any]]], *, several: bool, param: str) -> str:
    """GBNF for Qwen tool-call blocks calling one of `functions` (name, parameters schema)."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for name, parameters in functions
    ]
    call_schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    call_rules = schema_grammar(call_schema, param=param, prop_order=["name", "arguments"])
    call_rules = re.sub(r"^root ::=", "tool-call-json ::=", call_rules, flags=re.MULTILINE)
    block = f'{json.dumps(OPEN_TAG + chr(10))} tool-call-json {json.dumps(chr(10) + CLOSE_TAG)}'
    root = 'root ::= tool-call-block ("\\n" tool-call-block)*' if several else "root ::= tool-call-block"
    return f"{root}\ntool-call-block ::= {block}\n{call_rules}"
