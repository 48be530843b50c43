"""llama.cpp grammars (GBNF) for forced tool calls and JSON output, built by llama-cpp-python's converter.

Every schema is checked against `schemalimits` first; conversions are cached by their inputs.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from typing import Any

from llama_cpp import llama_grammar
from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

from edge_server.dialects.schemalimits import SchemaRefused, check_schema_limits
from edge_server.dialects.calls import CLOSE_TAG, OPEN_TAG


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
    check_schema_limits(schema, param=param)
    return _converted({"answer": schema}, param=param)


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
    check_signatures(functions, param=param, answer=answer)
    rules = _converted({"calls": functions, "answer": answer[0] if answer else None}, param=param)
    block = f'{json.dumps(OPEN_TAG + chr(10))} tool-call-json {json.dumps(chr(10) + CLOSE_TAG)}'
    calls = 'tool-call-block ("\\n" tool-call-block)*' if several else "tool-call-block"
    root = f"root ::= {calls} | answer-json" if answer else f"root ::= {calls}"
    return f"{root}\ntool-call-block ::= {block}\n{rules}"


def check_signatures(functions: list[tuple[str, dict[str, Any] | None]], *, param: str,
                     answer: tuple[dict[str, Any], str] | None = None) -> None:
    """Check every function's parameters schema (and the answer's) against `schemalimits`."""
    for _, parameters in functions:
        if parameters is not None:
            check_schema_limits(parameters, param=param)
    if answer is not None:
        check_schema_limits(answer[0], param=answer[1])


def property_value_rules(tools: list[tuple[dict[str, Any], list[str]]], *, param: str,
                         answer: dict[str, Any] | None = None) -> str:
    """GBNF rules `param-{i}-{j}` for one JSON value of property `names[j]` of `tools[i] = (parameters, names)`
    (the property's $refs resolved against those parameters), and `answer-json` for `answer`.

    The schemas must have passed `check_signatures`.
    """
    return _converted({"values": tools, "answer": answer}, param=param)


def text_without(name: str, forbidden: str) -> str:
    """GBNF rules, the first named `name`, for any text (newlines too) in which `forbidden` does not occur.

    The rules are the states of the automaton that tracks how much of `forbidden` the text ends with
    (state k: the last k characters are its first k); the character that would complete it has no rule.
    """
    alphabet = sorted(set(forbidden))

    def state(matched: int) -> str:
        return name if matched == 0 else f"{name}-{matched}"

    def step(matched: int, char: str) -> int:
        text = forbidden[:matched] + char
        while not forbidden.startswith(text):
            text = text[1:]
        return len(text)

    lines = []
    for matched in range(len(forbidden)):
        targets: dict[int, list[str]] = {}
        for char in alphabet:
            target = step(matched, char)
            if target < len(forbidden):
                targets.setdefault(target, []).append(char)
        branches = [f"{_char_class(chars)} {state(target)}" for target, chars in targets.items()]
        branches.append(f"{_char_class(alphabet, negated=True)} {state(0)}")
        lines.append(f"{state(matched)} ::= ({' | '.join(branches)})?")
    return "\n".join(lines)


_LITERAL_SPECIAL = '"\\'
_CLASS_SPECIAL = "[]^-\\"


def gbnf_literal(text: str) -> str:
    """`text` as a GBNF string literal."""
    return '"' + "".join(_escaped(char, _LITERAL_SPECIAL) for char in text) + '"'


def _char_class(chars: list[str], *, negated: bool = False) -> str:
    return "[" + ("^" if negated else "") + "".join(_escaped(char, _CLASS_SPECIAL) for char in chars) + "]"


def _escaped(char: str, special: str) -> str:
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    return f"\\x{ord(char):02X}" if char in special or ord(char) < 0x20 or ord(char) == 0x7F else char


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class _Converter(SchemaConverter):
    """llama-cpp-python's converter, naming each $ref's rule after the whole reference.

    Upstream names it after the reference's last segment and reuses any rule of that name, so two
    tools that both define `$defs/Item`, or a definition called `string`, would share one rule.
    """

    def _resolve_ref(self, ref: str) -> str:
        rule_name = f"ref-{_UNSAFE_RULE_CHARACTERS.sub('-', ref)}-{hashlib.sha256(ref.encode()).hexdigest()[:8]}"
        if rule_name not in self._rules and ref not in self._refs_being_resolved:
            self._refs_being_resolved.add(ref)
            rule_name = self.visit(self._refs[ref], rule_name)
            self._refs_being_resolved.remove(ref)
        return rule_name

    def visit_as(self, schema: dict[str, Any], name: str) -> None:
        """Visit `schema` as rule `name` (a primitive type's rule keeps its own name: refer to it)."""
        rule = self.visit(schema, name)
        if rule != name and self._add_rule(name, rule) != name:
            raise ValueError(f"the rule {name} is taken")


_UNSAFE_RULE_CHARACTERS = re.compile(r"[^a-zA-Z0-9-]+")
_CACHE_ENTRIES = 64
_CACHE_LARGEST = 256 * 1024  # characters of GBNF worth keeping
_cache: OrderedDict[str, str] = OrderedDict()
_cache_lock = threading.Lock()


def _converted(spec: dict[str, Any], *, param: str) -> str:
    """Rules for `spec` (`calls`: [(name, parameters)], `values`: [(parameters, [property])], `answer`: schema),
    from the cache when seen before."""
    # Keyed by a digest of the canonical input (property order kept: it is the order the output follows),
    # so a client that repeats its tools or format pays once and the cache never holds their text.
    text = json.dumps(spec)
    key = hashlib.sha256(text.encode()).hexdigest()
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        rules = _convert(json.loads(text))  # a private copy: the converter rewrites $refs in place
    except Exception as error:  # the converter raises many types (KeyError, ValueError, AssertionError...)
        raise SchemaRefused(f"Cannot constrain output to this JSON schema: {type(error).__name__}: {error}",
                            param=param, code="unsupported_schema") from None
    if len(rules) <= _CACHE_LARGEST:
        with _cache_lock:
            _cache[key] = rules
            while len(_cache) > _CACHE_ENTRIES:
                _cache.popitem(last=False)
    return rules


def _convert(spec: dict[str, Any]) -> str:
    calls, values, answer = spec.get("calls"), spec.get("values"), spec.get("answer")
    converter = _Converter(prop_order={"name": 0, "arguments": 1} if calls else {}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    if calls is not None:
        # Each tool's $refs are resolved against its own parameters, before they are embedded in a call.
        variants = [
            {"type": "object", "required": ["name", "arguments"], "properties": {
                "name": {"const": name},
                "arguments": converter.resolve_refs(parameters or {"type": "object"}, f"tool-{i}"),
            }}
            for i, (name, parameters) in enumerate(calls)
        ]
        converter.visit(variants[0] if len(variants) == 1 else {"anyOf": variants}, "tool-call-json")
    for i, (parameters, names) in enumerate(values or []):
        resolved = converter.resolve_refs(parameters, f"tool-{i}")
        for j, name in enumerate(names):
            rule = f"param-{i}-{j}"
            converter.visit_as(resolved["properties"][name], rule)
    if answer is not None:
        beside_calls = calls is not None or values is not None
        converter.visit(converter.resolve_refs(answer, "answer"), "answer-json" if beside_calls else "")
    return converter.format_grammar()
