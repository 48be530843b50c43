"""What a chat request asks of tools and structured output: template tools, grammar, how to parse."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import APIError
from .grammars import any_json_object_grammar, schema_grammar, tool_call_grammar
from .schemas import ChatCompletionRequest, FunctionName, NamedToolChoice
from .toolcalls import ToolCallExtractor


@dataclass(frozen=True)
class ToolPlan:
    """The tool/format decisions for one request, made before anything is generated."""

    template_tools: list[dict[str, Any]] | None = None  # what the chat template lists for the model
    callable_names: frozenset[str] = frozenset()  # calls to extract from the output (empty: plain text)
    max_calls: int | None = None
    legacy: bool = False  # answer with `function_call` instead of `tool_calls`
    grammar: str | None = None

    def extractor(self, *, incremental: bool) -> ToolCallExtractor | None:
        """A fresh tool-call extractor for the output, or None when calls are not expected."""
        if not self.callable_names:
            return None
        return ToolCallExtractor(self.callable_names, max_calls=self.max_calls, incremental=incremental)


def plan_tools(request: ChatCompletionRequest) -> ToolPlan:
    """Decide how `request`'s tools, tool choice and response format shape prompt, sampling and parsing."""
    functions = request.function_definitions()
    legacy = bool(request.functions)
    choice = request.function_call if legacy else request.tool_choice
    param = "function_call" if legacy else "tool_choice"
    format_grammar = _response_format_grammar(request)
    if not functions or choice == "none":
        return ToolPlan(grammar=format_grammar)
    template_tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in functions]
    several = request.parallel_tool_calls and not legacy
    named = choice.function.name if isinstance(choice, NamedToolChoice) else (
        choice.name if isinstance(choice, FunctionName) else None)
    if named is not None:
        chosen = [f for f in functions if f.name == named]
        grammar = tool_call_grammar([(f.name, f.parameters) for f in chosen], several=False, param=param)
        return ToolPlan(template_tools, frozenset([named]), 1, legacy, grammar)
    names = frozenset(f.name for f in functions)
    if choice == "required":
        grammar = tool_call_grammar([(f.name, f.parameters) for f in functions], several=several, param=param)
        return ToolPlan(template_tools, names, None if several else 1, legacy, grammar)
    return ToolPlan(template_tools, names, None if several else 1, legacy, format_grammar)


def _response_format_grammar(request: ChatCompletionRequest) -> str | None:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return any_json_object_grammar()
    spec = response_format.json_schema
    if spec.strict:
        _check_strict(spec.schema_, "response_format.json_schema.schema")
    return schema_grammar(spec.schema_ or {"type": "object"}, param="response_format.json_schema.schema")


def _check_strict(schema: Any, param: str) -> None:
    # OpenAI's strict mode: every object lists all its properties as required and allows no others.
    if isinstance(schema, dict):
        properties = schema.get("properties")
        if isinstance(properties, dict):
            missing = set(properties) - set(schema.get("required", []))
            if missing or schema.get("additionalProperties") is not False:
                raise APIError(
                    "strict schemas must list every property in 'required' and set 'additionalProperties': false"
                    + (f" (not required: {', '.join(sorted(missing))})" if missing else ""),
                    param=param, code="invalid_schema")
        for value in schema.values():
            _check_strict(value, param)
    elif isinstance(schema, list):
        for value in schema:
            _check_strict(value, param)
