"""Bounds on client JSON schemas, checked before any grammar is built from them (pure).

A schema's compile time and per-token cost grow with repetition counts, enum values and alternatives;
these bounds (with llguidance's own, `constraints.LIMITS`) keep every accepted schema cheap to compile.
Measured on llguidance 1.9.1 (SmolLM2's vocabulary, bench/results.md): a string's length bound costs nothing
until it is reached (llguidance counts characters in its lexer: maxLength 10^9 compiles in ~1 ms), so it is
bounded only where real schemas stop (64 KiB text columns); 256 enum values or anyOf branches compile in
1-60 ms, 256 properties in ~70 ms + ~95 ms, while 5,000 branches take ~0.2 s and 3,000 properties ~4 s: those
two stay bounded here. Item and regex repetition stay at 1000: llguidance expands minItems into the grammar,
and a nested pattern quantifier such as ((a{1,1000}){1,1000}) runs out of its lexer fuel mid-answer (an error
after the 200 was sent) instead of being refused up front.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


MAX_SCHEMA_DEPTH = 32  # nested subschemas
MAX_REPETITION = 1000  # minItems/maxItems, min/maxProperties, regex {m,n}
MAX_STRING_LENGTH = 65_536  # minLength/maxLength
MAX_ALTERNATIVES = 256  # enum values + anyOf/oneOf branches + type lists, over the whole schema
MAX_PROPERTIES = 256  # properties of one object
MAX_PATTERN_LENGTH = 1000  # characters of one `pattern`
MAX_PROPERTIES_IN_ALL = 512  # properties over the whole schema (allOf merges objects)

LIMITS_TEXT = (f"schemas may nest {MAX_SCHEMA_DEPTH} levels, bound string lengths up to {MAX_STRING_LENGTH}, "
               f"repeat at most {MAX_REPETITION} times (item and property counts, regex {{m,n}}), offer at most "
               f"{MAX_ALTERNATIVES} alternatives "
               f"(enum values and anyOf/oneOf branches together), list {MAX_PROPERTIES} properties per object, "
               f"{MAX_PROPERTIES_IN_ALL} in all, and use patterns "
               f"of up to {MAX_PATTERN_LENGTH} characters expanding to at most {MAX_REPETITION} repeated items")

class SchemaRefused(ValueError):
    """A client schema this server will not turn into a grammar; `param` names the request field."""

    def __init__(self, message: str, *, param: str, code: str):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
                  "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_COUNT_PAIRS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"),
                ("minContains", "maxContains"))


def subschemas(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The schemas directly nested in `schema`, by JSON Schema keyword (not every dict is a schema:
    the keys of `properties` are names, and a property may well be called `properties`)."""
    for keyword in _SCHEMA_MAPS:
        value = schema.get(keyword)
        if isinstance(value, dict):
            yield from (child for child in value.values() if isinstance(child, dict))
    for keyword in _SCHEMA_LISTS:
        value = schema.get(keyword)
        if isinstance(value, list):
            yield from (child for child in value if isinstance(child, dict))
    items = schema.get("items")
    if isinstance(items, dict):
        yield items
    elif isinstance(items, list):
        yield from (child for child in items if isinstance(child, dict))
    for keyword in _SCHEMA_VALUES:
        value = schema.get(keyword)
        if isinstance(value, dict):
            yield value


def walk(schema: dict[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """Every schema node with its depth (the root is depth 1), iteratively."""
    pending = [(schema, 1)]
    while pending:
        node, depth = pending.pop()
        yield node, depth
        pending.extend((child, depth + 1) for child in subschemas(node))


def check_schema_limits(schema: Any, *, param: str) -> None:
    """Raise `SchemaRefused` naming the bound when `schema` exceeds one of the limits above."""
    if not isinstance(schema, dict):
        raise SchemaRefused("A JSON schema must be an object.", param=param, code="invalid_schema")
    for _, depth in walk(schema):
        if depth > MAX_SCHEMA_DEPTH:
            _too_large(param, f"it nests more than {MAX_SCHEMA_DEPTH} levels")
    alternatives = property_count = 0
    # Counted over every object in the document, not only schema keywords: a $ref may point anywhere.
    for node in _every_object(schema):
        _check_counts(node, param)
        enum = node.get("enum")
        alternatives += len(enum) if isinstance(enum, list) else 0
        for keyword in ("anyOf", "oneOf"):
            branches = node.get(keyword)
            alternatives += len(branches) if isinstance(branches, list) else 0
        if isinstance(node.get("type"), list):
            alternatives += len(node["type"])
        if alternatives > MAX_ALTERNATIVES:
            _too_large(param, f"it offers more than {MAX_ALTERNATIVES} alternatives (enum values and "
                              f"anyOf/oneOf branches together)")
        properties = node.get("properties")
        if isinstance(properties, dict):
            if len(properties) > MAX_PROPERTIES:
                _too_large(param, f"an object lists {len(properties)} properties, above {MAX_PROPERTIES}")
            property_count += len(properties)
            if property_count > MAX_PROPERTIES_IN_ALL:
                _too_large(param, f"it lists more than {MAX_PROPERTIES_IN_ALL} properties in all")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            _check_pattern(pattern, param)


def _every_object(document: Any) -> Iterator[dict[str, Any]]:
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            yield value
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


def _check_counts(node: dict[str, Any], param: str) -> None:
    for low, high in _COUNT_PAIRS:
        counts = []
        for keyword in (low, high):
            count = node.get(keyword)
            if count is not None and not isinstance(count, dict | list):
                if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                    _invalid(param, f"'{keyword}' must be a whole number of at least 0, got {json.dumps(count)}")
                bound = MAX_STRING_LENGTH if low == "minLength" else MAX_REPETITION
                if count > bound:
                    _too_large(param, f"'{keyword}' is {count}, above {bound}")
            counts.append(count if isinstance(count, int) else None)
        if None not in counts and counts[0] > counts[1]:
            _invalid(param, f"'{low}' ({counts[0]}) is above '{high}' ({counts[1]})")


def _check_pattern(pattern: str, param: str) -> None:
    """Read `pattern`'s escapes, [classes], (groups) and {m,n} and bound its expanded size: every quantifier
    multiplies what it repeats, nested ones multiply again.

    Such patterns passed each per-quantifier bound yet cost per character: llama.cpp's grammar took the engine
    thread seconds per character on "a{0,1000}" written 110 times; llguidance's lexer runs out of its fuel
    on "((a{1,1000}){1,1000})" after some 50 tokens, failing the answer after its 200 was sent.
    """
    if len(pattern) > MAX_PATTERN_LENGTH:
        _too_large(param, f"a pattern has {len(pattern)} characters, above {MAX_PATTERN_LENGTH}")
    # Each open group: [size of its content so far, size of its last atom].
    groups: list[list[int]] = [[0, 0]]
    i, n = 0, len(pattern)
    while i < n:
        char, atom = pattern[i], None
        if char == "\\":
            i, atom = i + 2, 1
        elif char == "[":
            i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i, atom = i + 1, 1
        elif char == "(":
            groups.append([0, 0])
            i += 1
        elif char == ")" and len(groups) > 1:
            atom = groups.pop()[0]
            i += 1
        elif char == "{" and (end := pattern.find("}", i)) >= 0:
            times = _check_quantifier(pattern[i:end + 1], param)
            group = groups[-1]
            group[0] += group[1] * (times - 1)
            group[1] *= times
            i = end + 1
        elif char in "^$":
            i += 1  # anchors match no character
        elif char in "]}":
            # Read as a literal by some regex dialects and as an error by others: the client must say which.
            _invalid(param, f"the pattern has an unmatched '{char}' at position {i}; escape it as '\\{char}'")
        else:
            i, atom = i + 1, 1
        if atom is not None:
            groups[-1][0] += atom
            groups[-1][1] = atom
        if groups[-1][0] > MAX_REPETITION or any(group[0] > MAX_REPETITION for group in groups):
            _too_large(param, f"the pattern expands to more than {MAX_REPETITION} repeated items "
                              f"(quantifiers multiply what they repeat, nested ones multiply again)")


def _check_quantifier(quantifier: str, param: str) -> int:
    """How many times `quantifier` may repeat its atom at most (its minimum when unbounded)."""
    # int() also reads "1_000_000" and "+5": such a count is bounded like any other.
    parts = [part.strip() for part in quantifier[1:-1].split(",")]
    try:
        counts = [int(part) if part else None for part in parts]
    except ValueError:
        return 1  # not a quantifier: llguidance reads the braces as it reads them, or refuses the pattern
    given = [count for count in counts if count is not None]
    if any(count < 0 for count in given):
        _invalid(param, f"pattern quantifier {quantifier} has a negative count")
    if any(count > MAX_REPETITION for count in given):
        _too_large(param, f"pattern quantifier {quantifier} repeats more than {MAX_REPETITION} times")
    if len(counts) == 2 and None not in counts and counts[0] > counts[1]:
        _invalid(param, f"pattern quantifier {quantifier} has its minimum above its maximum")
    return max(given, default=1) or 1


def _invalid(param: str, reason: str) -> None:
    raise SchemaRefused(f"Invalid JSON schema: {reason}.", param=param, code="invalid_schema")


def _too_large(param: str, reason: str) -> None:
    raise SchemaRefused(f"This JSON schema is too large to enforce: {reason}. Limits: {LIMITS_TEXT}.", param=param,
                        code="schema_too_large")
