"""llguidance grammars (Lark with embedded JSON schemas) for structured output, forced tool calls and
client GBNF (llama.cpp's `grammar` field, read by llguidance's converter).

Every schema is checked against `schemalimits` first, then compiled by llguidance once on its own (no
vocabulary needed): what llguidance cannot enforce is a 400 naming the feature, before any prompt work.
A schema it compiles is enforced as written, `strict` or not. JSON is written compact (`{"a":1,"b":[2]}`),
properties in the schema's order.

The tags a dialect writes (`<tool_call>`, `</think>`...) are rules named `edge_tag_*` here; `compile_matcher`
defines them for the served vocabulary: its special token where it has one (as the model was trained to
write it) or the text. No other text, a JSON string included, can hold a special token.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

from edge_server.dialects.calls import CLOSE_TAG, OPEN_TAG
from edge_server.dialects.schemalimits import SchemaRefused, check_schema_limits

THINK_CLOSE = "</think>"
# Rule name -> the tag it stands for.
TAGS = {"edge_tag_call_open": OPEN_TAG, "edge_tag_call_close": CLOSE_TAG}
THINK_RULE = "edge_think"  # reasoning text and its closing tag

_COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# Tool calls are written as chat templates render them to the model (Jinja's `tojson`): `{"a": 1, "b": 2}`.
_AS_RENDERED = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Bounded work per compile and per token for any client grammar (llguidance's defaults are higher:
# a hostile schema is refused or errs within milliseconds, never holds a thread for seconds).
LIMITS = dict(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
              max_lexer_states=100_000, max_grammar_size=200_000, verbose_errors=False)


def parser_limits() -> llguidance.LLParserLimits:
    """The work bounds every grammar is compiled and run under."""
    return llguidance.LLParserLimits(**LIMITS)


def json_rule(schema: dict[str, Any], *, as_rendered: bool = False) -> str:
    """A Lark `%json` body for `schema`, written compact (`as_rendered`: spaced as templates render tool calls)."""
    options = {**schema, "x-guidance": _AS_RENDERED if as_rendered else _COMPACT}
    return "%json " + json.dumps(options, ensure_ascii=False)


def lark_literal(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def text_without(name: str, forbidden: str) -> str:
    """A Lark terminal `name` for any text (newlines too) in which `forbidden` does not occur."""
    word = "".join(char if char.isalnum() and char.isascii() else f"\\x{{{ord(char):X}}}" for char in forbidden)
    return f"{name}: /(.|\\n)*/ & ~/(.|\\n)*{word}(.|\\n)*/"


def schema_grammar(schema: dict[str, Any], *, param: str) -> str:
    """A grammar admitting exactly the JSON values `schema` describes; a 400 if too large or unsupported."""
    check_schema_limits(schema, param=param)
    grammar = f"start: {json_rule(schema)}\n"
    check_grammar(grammar, param=param)
    return grammar


def gbnf_grammar(gbnf: str, *, param: str = "grammar") -> str:
    """The Lark grammar for a client's GBNF (llama.cpp's syntax, root rule `root`); a 400 naming `param` when
    llguidance cannot read or enforce it."""
    try:
        lark = gbnf_to_lark(gbnf)
    except RecursionError:
        raise SchemaRefused("Cannot read this GBNF grammar: it nests too deeply.", param=param,
                            code="invalid_grammar") from None
    except Exception as error:  # the converter raises bare Exceptions for unknown or missing rules
        raise SchemaRefused(f"Cannot read this GBNF grammar: {_first_line(str(error))}.", param=param,
                            code="invalid_grammar") from None
    # Our own rules (tags, the reasoning prefix) are named edge_*; a client rule of that name would redefine one.
    if reserved := re.search(r"^(edge_\w*)\s*:", lark, flags=re.MULTILINE | re.IGNORECASE):
        raise SchemaRefused(f"Cannot use this GBNF grammar: rule names starting with 'edge' are reserved "
                            f"(rename {reserved.group(1)!r}).", param=param, code="invalid_grammar")
    grammar = re.sub(r"^%llguidance \{\}\n", "", lark)  # compile_matcher sets llguidance's options itself
    check_grammar(grammar, param=param, subject="this GBNF grammar", code="invalid_grammar")
    return grammar


def any_json_object_grammar() -> str:
    """A grammar for any JSON object (`response_format: json_object`)."""
    return f"start: {json_rule({'type': 'object'})}\n"


def check_signatures(functions: list[tuple[str, dict[str, Any] | None]], *, param: str,
                     answer: tuple[dict[str, Any], str] | None = None) -> None:
    """Check every function's parameters schema (and the answer's) against `schemalimits`, then compile each
    alone (a dialect may write some values as text: what llguidance cannot enforce is refused all the same)."""
    for _, parameters in functions:
        if parameters is not None:
            check_schema_limits(parameters, param=param)
            check_grammar(f"start: {json_rule(parameters)}\n", param=param)
    if answer is not None:
        check_schema_limits(answer[0], param=answer[1])
        check_grammar(f"start: {json_rule(answer[0])}\n", param=answer[1])


def tool_call_grammar(functions: list[tuple[str, dict[str, Any] | None]], *, several: bool, param: str,
                      answer: tuple[dict[str, Any], str] | None = None) -> str:
    """Hermes JSON tool-call blocks calling one of `functions` (name, parameters schema).

    With `answer` (a schema and the request field it came from), the output may instead be one JSON
    value of that schema: tools offered in `auto` mode beside a structured answer give a call or the
    answer, never an answer forced into the schema with no way to call.
    """
    check_signatures(functions, param=param, answer=answer)
    calls = 'call ("\\n" call)*' if several else "call"
    lines = [f"start: {calls}" + (" | answer" if answer else ""),
             'call: edge_tag_call_open "\\n" (' + " | ".join(f"fn_{i}" for i in range(len(functions)))
             + ') "\\n" edge_tag_call_close']
    for i, (name, parameters) in enumerate(functions):
        # One schema per function, so each keeps its own root for its `$ref`s.
        call = {"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                "properties": {"name": {"const": name}, "arguments": {"$ref": "#/$defs/edge-arguments"}},
                "$defs": {"edge-arguments": {"type": "object"}}}
        if parameters is not None:
            call = _wrapped(parameters, call)
        lines.append(f"fn_{i}: {json_rule(call, as_rendered=True)}")
    if answer:
        lines.append(f"answer: {json_rule(answer[0])}")
    grammar = "\n".join(lines) + "\n"
    check_grammar(grammar, param=param)
    return grammar


def _wrapped(parameters: dict[str, Any], call: dict[str, Any]) -> dict[str, Any]:
    """`call` with `parameters` as its arguments, their local `$ref`s re-pointed to where they now are."""
    moved = _repointed(copy.deepcopy(parameters), "#/$defs/edge-arguments")
    return {**call, "$defs": {"edge-arguments": moved}}


def _repointed(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                node[key] = prefix + value[1:]
            else:
                _repointed(value, prefix)
    elif isinstance(node, list):
        for value in node:
            _repointed(value, prefix)
    return node


def value_schema(schema: Any, root: dict[str, Any]) -> dict[str, Any]:
    """`schema` (a property of `root`) as a schema of its own: `root`'s local `$ref`s re-pointed to copies."""
    if not isinstance(schema, dict):
        schema = {}
    return {**_repointed(copy.deepcopy(schema), "#/$defs/edge-root"),
            "$defs": {"edge-root": _repointed(copy.deepcopy(root), "#/$defs/edge-root")}}


def after_reasoning(grammar: str) -> str:
    """`grammar` preceded by a reasoning block's text and its `</think>` (the prompt opened `<think>`)."""
    renamed, count = re.subn(r"^start:", "edge_answer:", grammar, flags=re.MULTILINE)
    if count != 1:
        raise ValueError("the grammar must define exactly one start rule")
    return f"start: {THINK_RULE} /[ \\t\\n]*/ edge_answer\n{renamed}"


def check_grammar(grammar: str, *, param: str, subject: str = "this JSON schema",
                  code: str = "unsupported_schema") -> None:
    """Compile `grammar` without a vocabulary; `SchemaRefused` naming what llguidance cannot enforce."""
    error = _validation_error(grammar)
    if error:
        raise SchemaRefused(f"Cannot constrain output to {subject}: {error}", param=param, code=code)


def _validation_error(grammar: str) -> str:
    # The tag rules are defined per vocabulary; any definition serves to check the rest.
    text = grammar + "".join(f"{name}: {lark_literal(tag)}\n" for name, tag in TAGS.items() if name in grammar)
    if THINK_RULE in grammar:
        text += f"{THINK_RULE}: {lark_literal(THINK_CLOSE)}\n"
    return _validated(llguidance.LLMatcher.grammar_from_lark(text))


@functools.lru_cache(maxsize=256)
def _validated(text: str) -> str:
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, None, limits=parser_limits())
    if is_error:
        return _first_line(messages[0])
    unsupported = [m for m in messages if "Unimplemented" in m or "unimplemented" in m]
    return _first_line(unsupported[0]) if unsupported else ""


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "llguidance refused the grammar"


class GrammarError(ValueError):
    """A grammar llguidance would not compile for this vocabulary."""


def compile_matcher(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """A matcher for `grammar` on `tokenizer`'s vocabulary, the tags defined for it; raises `GrammarError`."""
    # Every token that spells allowed text stays in the mask (llguidance otherwise admits only the tokenizer's
    # own tokens where the text is forced): the model's distribution, restricted to what the grammar allows.
    lines = ['%llguidance {"no_forcing": true}', grammar]
    for name, tag in TAGS.items():
        if name in grammar:
            lines.append(f"{name}: {_tag(tokenizer, tag)}")
    if THINK_RULE in grammar:
        close = _special(tokenizer, THINK_CLOSE)
        if close is None:
            # One terminal: text that cannot hold `</think>` and then `</think>`, so it ends at the first.
            lines += [text_without("EDGE_THINK_TEXT", THINK_CLOSE),
                      f"EDGE_THINK: EDGE_THINK_TEXT {lark_literal(THINK_CLOSE)}", f"{THINK_RULE}: EDGE_THINK"]
        else:
            lines.append(f"{THINK_RULE}: /(.|\\n)*/ <[{close}]>")
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark("\n".join(lines) + "\n"),
                                   log_level=0, limits=parser_limits())
    if matcher.is_error():
        raise GrammarError(_first_line(matcher.get_error()))
    return matcher


def _tag(tokenizer: llguidance.LLTokenizer, tag: str) -> str:
    # The text too: models (and scripted test models) may spell a tag in ordinary tokens; the calls read the same.
    token = _special(tokenizer, tag)
    return lark_literal(tag) if token is None else f"<[{token}]> | {lark_literal(tag)}"


def _special(tokenizer: llguidance.LLTokenizer, text: str) -> int | None:
    """The special token that is `text` in this vocabulary, or None."""
    tokens = tokenizer.tokenize_str(text, parse_special=True)
    return tokens[0] if len(tokens) == 1 and tokenizer.is_special_token(tokens[0]) else None
