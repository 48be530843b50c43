"""What a chat request asks of tools and structured output: template tools, grammar, how to parse."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_server.dialects.calls import CallExtractor
from edge_server.dialects.dialect import ToolDialect
from edge_server.dialects.constraints import any_json_object_grammar, gbnf_grammar, schema_grammar
from edge_server.dialects.schemalimits import SchemaRefused, check_schema_limits
from edge_server.api.schemas import ChatCompletionRequest, FunctionDefinition, FunctionName, NamedToolChoice


ANSWER_SCHEMA_PARAM = "response_format.json_schema.schema"


@dataclass(frozen=True)
class ToolPlan:
    """The tool/format decisions for one request, made before anything is generated."""

    template_tools: list[dict[str, Any]] | None = None  # what the chat template lists for the model
    # The functions whose calls are extracted from the output, with their parameters (empty: plain text).
    functions: Mapping[str, dict[str, Any] | None] = field(default_factory=dict)
    max_calls: int | None = None
    legacy: bool = False  # answer with `function_call` instead of `tool_calls`
    grammar: str | None = None
    dialect: ToolDialect | None = None  # how the model writes calls (set whenever `functions` is)
    grammar_param: str = "response_format"  # the request field a grammar the engine refuses came from

    @property
    def callable_names(self) -> frozenset[str]:
        """The functions whose calls are extracted from the output."""
        return frozenset(self.functions)

    def extractor(self, *, incremental: bool) -> CallExtractor | None:
        """A fresh tool-call extractor for the output, or None when calls are not expected."""
        if not self.functions:
            return None
        return self.dialect.extractor(self.functions, max_calls=self.max_calls, incremental=incremental)


def plan_tools(request: ChatCompletionRequest, dialect: ToolDialect) -> ToolPlan:
    """Decide how `request`'s tools, tool choice and response format shape prompt, sampling and parsing,
    for a model that writes its calls in `dialect`."""
    functions = request.function_definitions()
    legacy = bool(request.functions)
    choice = request.function_call if legacy else request.tool_choice
    param = "function_call" if legacy else "tool_choice"
    answer_schema = _answer_schema(request)
    if request.grammar:
        _check_grammar_alone(answer_schema, bool(functions) and choice != "none")
        # Tools offered with tool_choice none are still listed in the prompt; nothing is extracted.
        template_tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in functions]
        return ToolPlan(template_tools or None, grammar=gbnf_grammar(request.grammar), grammar_param="grammar")
    if not functions or choice == "none":
        return ToolPlan(grammar=_answer_grammar(request, answer_schema))
    # A listed tool is only rendered into the prompt (bounded by the body and context limits); its schema is
    # checked, and compiled, where decoding is constrained by it: a forced or required call, or beside a
    # structured answer. The check comes first so that a refusal names the tool.
    template_tools = [{"type": "function", "function": f.model_dump(exclude_none=True)} for f in functions]
    several = request.parallel_tool_calls and not legacy
    named = choice.function.name if isinstance(choice, NamedToolChoice) else (
        choice.name if isinstance(choice, FunctionName) else None)
    if named is not None:
        chosen = [(f.name, f.parameters) for f in functions if f.name == named]
        _check_constrained(functions, {named}, legacy)
        grammar = dialect.call_grammar(chosen, several=False, param=param)
        return ToolPlan(template_tools, dict(chosen), 1, legacy, grammar, dialect, "tools")
    signatures = [(f.name, f.parameters) for f in functions]
    if choice == "required" or answer_schema is not None:
        _check_constrained(functions, {f.name for f in functions}, legacy)
    if choice == "required":
        grammar = dialect.call_grammar(signatures, several=several, param=param)
    elif answer_schema is not None:
        # auto beside a structured answer: the model either calls a tool or gives the answer.
        grammar = dialect.call_grammar(signatures, several=several, param=param,
                                       answer=(answer_schema, ANSWER_SCHEMA_PARAM))
    else:
        grammar = None
    return ToolPlan(template_tools, dict(signatures), None if several else 1, legacy, grammar, dialect, "tools")


def _check_grammar_alone(answer_schema: dict[str, Any] | None, callable_tools: bool) -> None:
    """A `grammar` is the whole output's shape: a JSON answer or a tool call would be a second one (llama-server
    refuses both too)."""
    if answer_schema is not None:
        raise SchemaRefused("Send either 'grammar' or a JSON 'response_format', not both: each describes the "
                            "whole output.", param="grammar", code="invalid_value")
    if callable_tools:
        raise SchemaRefused("'grammar' cannot be combined with tools the model may call (the calls have a grammar "
                            "of their own); send tool_choice 'none' or leave the tools out.", param="grammar",
                            code="invalid_value")


def _check_constrained(functions: list[FunctionDefinition], names: set[str], legacy: bool) -> None:
    """The schema limits of the functions a grammar is built from, naming the one at fault."""
    for index, function in enumerate(functions):
        if function.name in names and function.parameters is not None:
            check_schema_limits(function.parameters, param=f"{'functions' if legacy else 'tools'}.{index}")


def _answer_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The JSON schema the answer must match (`{"type": "object"}` for json_object), or None for text."""
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    # Enforced as written, `strict` or not (an optional property stays optional).
    return response_format.json_schema.schema_ or {"type": "object"}


def _answer_grammar(request: ChatCompletionRequest, answer_schema: dict[str, Any] | None) -> str | None:
    if answer_schema is None:
        return None
    if request.response_format.type == "json_object":
        return any_json_object_grammar()
    return schema_grammar(answer_schema, param=ANSWER_SCHEMA_PARAM)
