"""Qwen3-Coder / Qwen3.5 XML tool calls -> OpenAI tool-call events, and the grammar that forces them.

The model writes (templates `Qwen3-Coder.jinja`, `Qwen3.5-4B.jinja`)::

    <tool_call>
    <function=NAME>
    <parameter=P>
    VALUE
    </parameter>
    </function>
    </tool_call>

Values are untyped text (the templates render strings as they are, other values with `tojson`, or
Python's `str` for booleans and None), so each is typed by its property's JSON schema: JSON that
fits the schema's types is parsed, a string property keeps the text verbatim (inner newlines too;
only the one newline the format adds on each side is removed), and anything that does not parse
stays a string. Arguments stream one completed parameter at a time (`{"city": "Paris"`, then
`, "days": 3`, then `}`): a value's type is only known once it has ended.

As in llama.cpp's parser, a value ends at the first `</parameter>`, so `</tool_call>` inside a value
is part of it; the grammar never lets a string value contain `</parameter>`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection
from typing import Any

from edge_server.dialects.calls import (
    CLOSE_TAG,
    CallBlock,
    CallExtractor,
    Event,
    Functions,
    ToolCallArguments,
    ToolCallStart,
)
from edge_server.dialects.dialect import Signatures, ToolDialect
from edge_server.dialects.constraints import (
    check_grammar,
    check_signatures,
    json_rule,
    lark_literal,
    text_without,
    value_schema,
)

log = logging.getLogger("edge_server.toolcalls")

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"

_SPACE = re.compile(r"\s*")
_NOT_A_NAME = re.compile(r"[<>\n]")
_MAX_NAME = 256  # characters of a function or parameter name; a longer one breaks the block
_MAX_REF_HOPS = 32
_MAX_SCHEMA_DEPTH = 64
_UNPARSED = object()
_PYTHON_LITERALS = {"True": True, "False": False, "None": None}  # what Jinja's `| string` renders


# --- typing a value by its schema -------------------------------------------------------------


def json_kind(value: Any) -> str:
    """The JSON Schema type name of a parsed JSON value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", dict: "object", list: "array"}[type(value)]


def resolved(schema: Any, root: Any) -> Any:
    """`schema` with its local `$ref` followed within `root` (an unresolvable one reads as `{}`)."""
    for _ in range(_MAX_REF_HOPS):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str):
            return schema
        if not ref.startswith("#"):
            return {}
        schema = root
        for part in ref[1:].split("/")[1:]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(schema, dict) or part not in schema:
                return {}
            schema = schema[part]
    return {}


def members(schema: Any) -> list[Any] | None:
    """The values a schema lists (`const`, or a non-empty `enum`), or None."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return enum if isinstance(enum, list) and enum else None


def value_kinds(schema: Any, root: Any, depth: int = 0) -> frozenset[str] | None:
    """The JSON types `schema` admits, or None when it does not say (any value)."""
    schema = resolved(schema, root)
    if not isinstance(schema, dict) or depth > _MAX_SCHEMA_DEPTH:
        return None
    kind = schema.get("type")
    if isinstance(kind, str):
        return frozenset([kind])
    if isinstance(kind, list):
        return frozenset(k for k in kind if isinstance(k, str)) or None
    listed = members(schema)
    if listed is not None:
        return frozenset(json_kind(value) for value in listed)
    for keyword in ("anyOf", "oneOf"):
        branches = schema.get(keyword)
        if isinstance(branches, list) and branches:
            kinds = [value_kinds(branch, root, depth + 1) for branch in branches]
            return None if None in kinds else frozenset().union(*kinds)
    if "properties" in schema:
        return frozenset(["object"])
    if "items" in schema:
        return frozenset(["array"])
    return None


def parameter_schema(parameters: dict[str, Any], name: str) -> Any:
    """The schema of parameter `name`: its property's, else `additionalProperties`' (None: any value)."""
    properties = parameters.get("properties")
    if isinstance(properties, dict) and name in properties:
        return properties[name]
    extra = parameters.get("additionalProperties")
    return extra if isinstance(extra, dict) else None


def typed_value(text: str, schema: Any, root: Any) -> Any:
    """The argument value for a parameter's text: JSON of a type `schema` admits, else the text itself."""
    schema = resolved(schema, root)
    kinds = value_kinds(schema, root)
    if kinds == {"string"}:
        return text
    listed = members(schema) or []
    if text in (value for value in listed if isinstance(value, str)):
        return text
    value = _parsed(text.strip(), kinds)
    return text if value is _UNPARSED else value


def _parsed(text: str, kinds: frozenset[str] | None) -> Any:
    if text in _PYTHON_LITERALS:
        value = _PYTHON_LITERALS[text]
    else:
        try:
            value = json.loads(text, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):  # also NaN/Infinity, and integers past Python's digit limit
            return _UNPARSED
    kind = json_kind(value)
    if kind == "string":
        return _UNPARSED  # strings are the text as written, quotes and all
    if kinds is None or kind in kinds or (kind == "integer" and "number" in kinds):
        return value
    if kind == "number" and "integer" in kinds and value.is_integer():
        return int(value)
    return _UNPARSED


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# --- the streaming reader ---------------------------------------------------------------------


class _XmlCallBlock(CallBlock):
    """One `<tool_call>` block read tag by tag; each parameter's fragment goes out once it has ended."""

    def __init__(self, index: int, functions: Functions):
        super().__init__(index, functions)
        self._step: Callable[[list[Event]], bool] = self._function_open  # reads what comes at `_at`
        self._at = 0
        self._search_at = 0  # where to look for the closing tag that ends what is being read
        self._parameter = ""
        self._value_at = 0
        self._sent = 0  # parameters sent
        self._complete = False  # </function> read

    def push(self, text: str) -> list[Event]:
        self.raw += text
        events: list[Event] = []
        while not self.closed and self._step(events):
            pass
        return events

    def finish(self) -> tuple[list[Event], bool]:
        return [], self._complete

    # Each step reads from `_at` and says whether it got anywhere (False: it waits for more text).

    def _function_open(self, events: list[Event]) -> bool:
        tag = self._tag(FUNCTION_OPEN, CLOSE_TAG)
        if tag == FUNCTION_OPEN:
            self._step = self._function_name
        return tag is not None

    def _function_name(self, events: list[Event]) -> bool:
        name = self._tag_name(lambda name: name in self.functions)
        if name:
            self.name = name
            events.append(ToolCallStart(self.index, self.id, name))
            self._step = self._body
        return name is not None

    def _body(self, events: list[Event]) -> bool:
        tag = self._tag(PARAMETER_OPEN, FUNCTION_CLOSE, CLOSE_TAG)
        if tag == PARAMETER_OPEN:
            self._step = self._parameter_name
        elif tag in (FUNCTION_CLOSE, CLOSE_TAG):  # a missing </function> is forgiven
            events.append(ToolCallArguments(self.index, "}" if self._sent else "{}"))
            self._complete = True
            self._step = self._block_close
        return tag is not None

    def _parameter_name(self, events: list[Event]) -> bool:
        name = self._tag_name(bool)
        if name:
            self._parameter, self._value_at, self._search_at = name, self._at, self._at
            self._step = self._value
        return name is not None

    def _value(self, events: list[Event]) -> bool:
        end = self.raw.find(PARAMETER_CLOSE, self._search_at)
        if end < 0:
            self._search_at = max(self._value_at, len(self.raw) - len(PARAMETER_CLOSE) + 1)
            return False
        text = self.raw[self._value_at : end]
        text = text[1:] if text.startswith("\n") else text
        text = text[:-1] if text.endswith("\n") else text
        parameters = self.functions[self.name] or {}
        value = typed_value(text, parameter_schema(parameters, self._parameter), parameters)
        key = json.dumps(self._parameter, ensure_ascii=False)
        fragment = f"{', ' if self._sent else '{'}{key}: {json.dumps(value, ensure_ascii=False)}"
        events.append(ToolCallArguments(self.index, fragment))
        self._sent += 1
        self._at = end + len(PARAMETER_CLOSE)
        self._step = self._body
        return True

    def _block_close(self, events: list[Event]) -> bool:
        return self._tag(CLOSE_TAG) is not None

    def _to_block_close(self, events: list[Event]) -> bool:
        end = self.raw.find(CLOSE_TAG, self._search_at)
        if end < 0:
            self._search_at = max(self._at, len(self.raw) - len(CLOSE_TAG) + 1)
            return False
        self._close(end)
        return True

    def _tag(self, *tags: str) -> str | None:
        """The one of `tags` after white space at `_at` (read; `CLOSE_TAG` closes the block), None while
        the text may still become one, "" when it cannot (the block is broken)."""
        start = _SPACE.match(self.raw, self._at).end()
        ahead = self.raw[start : start + max(map(len, tags))]
        for tag in tags:
            if ahead.startswith(tag):
                self._at = start + len(tag)
                if tag == CLOSE_TAG:
                    self._close(start)
                return tag
        if not ahead:
            self._at = start  # white space read so far is not read again
            return None
        if any(tag.startswith(ahead) for tag in tags):
            return None
        self._break()
        return ""

    def _tag_name(self, accept: Callable[[str], bool]) -> str | None:
        """The name before the next `>` (read), None while it may still end, "" when it is no name or
        not accepted (the block is broken)."""
        end = self.raw.find(">", self._at, self._at + _MAX_NAME + 1)
        if end < 0:
            unfinished = self.raw[self._at :]
            if len(unfinished) <= _MAX_NAME and not _NOT_A_NAME.search(unfinished):
                return None
            name = ""
        else:
            name = self.raw[self._at : end].strip()
            self._at = end + 1
        if _NOT_A_NAME.search(name) or not accept(name):
            self._break()
            return ""
        return name

    def _break(self) -> None:
        if self._complete:
            log.warning("text after the function in a tool call block is ignored: %r", self.raw[self._at :][:200])
        self._search_at = self._at
        self._step = self._to_block_close

    def _close(self, at: int) -> None:
        self.closed, self.rest, self.raw = True, self.raw[at + len(CLOSE_TAG) :], self.raw[:at]


class XmlToolCallExtractor(CallExtractor):
    """Qwen XML `<tool_call>` blocks in streamed text -> content and tool-call events (see `CallExtractor`)."""

    def __init__(self, functions: Functions | Collection[str], *, max_calls: int | None = None,
                 incremental: bool = True):
        super().__init__(functions, _XmlCallBlock, max_calls=max_calls, incremental=incremental)


# --- the grammar for forced calls -------------------------------------------------------------


def xml_call_grammar(signatures: Signatures, *, several: bool, param: str,
                     answer: tuple[dict[str, Any], str] | None = None) -> str:
    """A grammar for XML calls to one of `signatures`: each declared parameter at most once in schema order,
    the required ones always, each value constrained by its schema (see `ToolDialect.call_grammar`)."""
    check_signatures(signatures, param=param, answer=answer)
    rules, functions = [], []
    for i, (name, parameters) in enumerate(signatures):
        schema = parameters or {"type": "object"}
        properties = schema.get("properties")
        required = schema.get("required") if isinstance(schema.get("required"), list) else []
        arguments = []
        if not isinstance(properties, dict):
            if schema.get("additionalProperties") is not False:
                arguments.append("XML_ANY_ARG*")
        else:
            for j, (key, prop) in enumerate(properties.items()):
                opening = lark_literal(f"{PARAMETER_OPEN}{key}>\n")
                rules.append(f"xml_arg_{i}_{j}: {opening} {_value_rule(prop, schema)}")
                arguments.append(f"xml_arg_{i}_{j}" + ("" if key in required else "?"))
        opening = lark_literal(f"{FUNCTION_OPEN}{name}>\n")
        rules.append(f"xml_fn_{i}: {opening} {' '.join(arguments)} {lark_literal(FUNCTION_CLOSE + chr(10))}")
        functions.append(f"xml_fn_{i}")
    calls = 'xml_call ("\\n" xml_call)*' if several else "xml_call"
    lines = [f"start: {calls}" + (" | answer" if answer else ""),
             f'xml_call: edge_tag_call_open "\\n" ({" | ".join(functions)}) edge_tag_call_close', *rules,
             # A text value and its closing tag are one terminal: the text cannot hold the tag, so it ends at the first.
             text_without("XML_TEXT", PARAMETER_CLOSE),
             f"XML_TEXT_VALUE: XML_TEXT {lark_literal(_VALUE_CLOSE)}",
             f'XML_ANY_ARG: {lark_literal(PARAMETER_OPEN)} /[^<>\\n]+/ ">\\n" XML_TEXT_VALUE']
    if answer:
        lines.append(f"answer: {json_rule(answer[0])}")
    grammar = "\n".join(lines) + "\n"
    check_grammar(grammar, param=param)
    return grammar


_VALUE_CLOSE = f"\n{PARAMETER_CLOSE}\n"


def _value_rule(schema: Any, root: dict[str, Any]) -> str:
    """A parameter's value as written in the XML, with its closing tag: listed values and text literally,
    anything else as JSON of its schema."""
    target = resolved(schema, root)
    listed = members(target)
    if listed is not None:
        texts = dict.fromkeys(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                              for value in listed)
        return "(" + " | ".join(lark_literal(text + _VALUE_CLOSE) for text in texts) + ")"
    kinds = value_kinds(target, root)
    if kinds is None or "string" in kinds:
        return "XML_TEXT_VALUE"
    return f"{json_rule(value_schema(schema, root), as_rendered=True)} {lark_literal(_VALUE_CLOSE)}"


def _asks_for_xml(template_source: str) -> bool:
    return FUNCTION_OPEN in template_source and PARAMETER_OPEN in template_source


# Qwen3-Coder / Qwen3.5: `<function=NAME>` and `<parameter=P>` tags inside `<tool_call>`.
DIALECT = ToolDialect("qwen_xml", 10, matches=_asks_for_xml, extractor_type=XmlToolCallExtractor,
                      grammar=xml_call_grammar)
