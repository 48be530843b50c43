"""Wire models of the OpenAI Responses API (`POST /v1/responses`): the request as the openai SDK and the
Agents SDK send it, and the `response` object and stream events this server answers with."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_serializer, model_validator)

from edge_server.api.schemas import MAX_TOOLS, FunctionDefinition, RequestModel, FieldError, whole_int
from edge_server.engine.types import Sampling

_DEFAULTS = Sampling()
_NULL = {"type": "null"}


def item_id(prefix: str) -> str:
    """A fresh id such as `resp_...`, `msg_...`, `fc_...`, `rs_...`."""
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ---- request -----------------------------------------------------------------------------------

class InputText(RequestModel):
    """A text part of a message's content (`input_text` from users, `output_text` of earlier answers)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputImage(RequestModel):
    """An image in a user message, for a model that sees images: `image_url` a data URL (or an http(s) URL on
    a server started with --allow-image-urls); `file_id` is refused (no files are kept here); `detail` is
    accepted (the projector decides the resolution)."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] | None = None


def _part_kind(part: Any) -> str | None:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return "image_part" if kind == "input_image" else "text_part"


ContentPart = Annotated[Union[Annotated[InputText, Tag("text_part")], Annotated[InputImage, Tag("image_part")]],
                        Discriminator(_part_kind)]


class MessageItem(RequestModel):
    """A message of the conversation (`type` may be left out, as the SDKs' easy input messages do)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        """The content's text (images left out)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, InputText))

    def has_images(self) -> bool:
        """Whether the content holds an `input_image` part."""
        return not isinstance(self.content, str) and any(isinstance(part, InputImage) for part in self.content)


class FunctionCallItem(RequestModel):
    """An earlier answer's function call, handed back with the conversation (`namespace`: of a namespace tool)."""

    type: Literal["function_call"]
    call_id: str
    name: str = Field(min_length=1)  # the template renders the call by its name
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(RequestModel):
    """The result of a function call, by the call's `call_id`."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]

    def text(self) -> str:
        """The output as one string."""
        return self.output if isinstance(self.output, str) else "".join(part.text for part in self.output)


class ReasoningPart(RequestModel):
    """A summary or reasoning text of a reasoning item."""

    type: Literal["summary_text", "reasoning_text"]
    text: str


class ReasoningItem(RequestModel):
    """An earlier answer's reasoning: handed to the template as the next assistant turn's reasoning."""

    type: Literal["reasoning"]
    summary: list[ReasoningPart] = Field(default_factory=list)
    content: list[ReasoningPart] | None = None

    def text(self) -> str:
        """The reasoning text (its content, else its summary)."""
        return "".join(part.text for part in (self.content or self.summary))


def _item_kind(item: Any) -> str | None:
    if isinstance(item, dict):
        return item.get("type") or ("message" if "role" in item else None)
    return getattr(item, "type", None)


_SKIPPED = ("message", "function_call", "function_call_output", "reasoning", "str", "text_part",
            "image_part")  # union tags in error paths
InputItem = Annotated[Union[
    Annotated[MessageItem, Tag("message")],
    Annotated[FunctionCallItem, Tag("function_call")],
    Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Annotated[ReasoningItem, Tag("reasoning")],
], Discriminator(_item_kind, custom_error_type="invalid_item", custom_error_message=(
    "input items must be messages, 'function_call', 'function_call_output' or 'reasoning' items "
    "(stored items and hosted tools' items are not supported)"))]


class FunctionTool(FunctionDefinition):
    """A function tool in the Responses API's flat shape."""

    type: Literal["function"]


def namespaced_name(namespace: str, name: str) -> str:
    """The one name a namespace's function has for the model (Codex's flat form: `ns__name`)."""
    return f"{namespace.rstrip('_')}__{name.lstrip('_')}"


class NamespaceTool(RequestModel):
    """A group of function tools (Codex sends its sub-agent tools so): the model sees each function under
    `namespaced_name`, and its calls come back with `name` and `namespace` apart."""

    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str | None = None
    tools: list[FunctionTool] = Field(max_length=MAX_TOOLS)


class HostedTool(RequestModel):
    """A tool that runs on OpenAI's side (web search, file search, MCP, ...) or takes free-form input
    (`custom`): none runs here, so the request goes on without it (a warning is logged)."""

    type: str = Field(description="any type but 'function' and 'namespace'",
                      json_schema_extra={"not": {"enum": ["function", "namespace"]}})


def _tool_kind(tool: Any) -> str:
    kind = tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None)
    return kind if kind in ("function", "namespace") else "hosted"


_TOOL_TAGS = ("function", "namespace", "hosted")
ToolSpec = Annotated[Union[
    Annotated[FunctionTool, Tag("function")],
    Annotated[NamespaceTool, Tag("namespace")],
    Annotated[HostedTool, Tag("hosted")],
], Discriminator(_tool_kind)]


class FunctionChoice(RequestModel):
    """`tool_choice: {"type": "function", "name": ...}` (a namespace's function by its own name, with its
    `namespace`, or by its namespaced name)."""

    type: Literal["function"]
    name: str
    namespace: str | None = None


class TextFormat(RequestModel):
    """`text.format`: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(populate_by_name=True, json_schema_extra={  # `_schema_given`
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["schema"], "properties": {"schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type 'json_schema' needs a 'schema' object")
        return self

    def echo(self) -> dict[str, Any]:
        """The format as the response repeats it."""
        if self.type != "json_schema":
            return {"type": self.type}
        echoed = {"type": "json_schema", "name": self.name or "response", "schema": self.schema_,
                  "strict": bool(self.strict)}
        return {**echoed, **({"description": self.description} if self.description is not None else {})}


class TextConfig(RequestModel):
    """`text`: the answer's format (`verbosity` is accepted and ignored)."""

    format: TextFormat | None = None


class ReasoningConfig(RequestModel):
    """`reasoning`: `effort` drives the template's thinking (`none` turns it off); `summary` is ignored."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None


UNSUPPORTED = {
    "previous_response_id": "this server keeps no responses (store: false); send the whole conversation in 'input'",
    "conversation": "this server keeps no conversations; send the whole conversation in 'input'",
    "prompt": "stored prompt templates are not kept on this server; send 'instructions' and 'input'",
    "background": "background responses need stored responses, which this server does not keep",
}


class ResponsesRequest(RequestModel):
    """Body of POST /v1/responses (stateless: `store` is read as false).

    Not supported (a 400 `unsupported_parameter`): `previous_response_id`, `conversation`, `prompt`,
    `background: true`. A named `tool_choice` must name one of `tools`."""

    model_config = ConfigDict(json_schema_extra={"allOf": [  # what `_choice_names_a_tool` checks
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [{"const": "required"},
                                                                                     {"type": "object"}]}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}]})

    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description="a user message, or the conversation as items")
    instructions: str | None = None
    tools: list[ToolSpec] | None = Field(None, max_length=MAX_TOOLS, description=(
        "function tools, namespaces of function tools, and tools that do not run here (hosted tools such as "
        "web_search, custom tools): those are left out, with a warning"))
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    max_output_tokens: whole_int(ge=1) | None = None
    temperature: float = Field(_DEFAULTS.temperature, ge=0.0, le=2.0)
    top_p: float = Field(_DEFAULTS.top_p, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = Field(None, description="accepted; nothing is stored either way")
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = None
    previous_response_id: str | None = Field(None, json_schema_extra={"anyOf": [_NULL]},
                                              description="not supported: " + UNSUPPORTED["previous_response_id"])
    background: bool | None = Field(None, json_schema_extra={"anyOf": [{"const": False}, _NULL]},
                                    description="not supported: " + UNSUPPORTED["background"])

    @field_validator("input", mode="wrap")
    @classmethod
    def _name_the_bad_item(cls, value: Any, handler: Any) -> Any:
        # Without this, pydantic's first complaint about a bad item list is that it is not a string.
        try:
            return handler(value)
        except ValidationError as error:
            if not isinstance(value, list):
                raise
            # The deepest complaint names the field at fault (not the union member a value failed first).
            first = max((e for e in error.errors(include_url=False) if e["loc"][:1] != ("str",)),
                        key=lambda e: len(e["loc"]))
            path = [str(part) for part in first["loc"] if not str(part).startswith("list[") and part not in _SKIPPED]
            raise FieldError(".".join(["input", *path]), first["msg"].removeprefix("Value error, ")) from None

    @field_validator("tools", mode="wrap")
    @classmethod
    def _name_the_bad_tool(cls, value: Any, handler: Any) -> Any:
        # The union's tag in an error's path names no field: tools.0.name, not tools.0.function.name.
        try:
            return handler(value)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            loc = [part for i, part in enumerate(first["loc"]) if not (i == 1 and part in _TOOL_TAGS)]
            raise FieldError(".".join(["tools", *map(str, loc)]), first["msg"].removeprefix("Value error, ")) from None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _no_hosted_choice(cls, value: Any) -> Any:
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise FieldError("tool_choice", f"names a {kind!r} tool, which does not run on this server (only "
                                            "function tools do)")
        return value

    @model_validator(mode="after")
    def _choice_names_a_tool(self) -> ResponsesRequest:
        functions = self.functions()
        flat = {name for name, _, _ in functions}
        if len(flat) != len(functions):
            raise FieldError("tools", "two function tools have the same name (a namespace's functions are named "
                                      "namespace__function)")
        if isinstance(self.tool_choice, FunctionChoice) and self.chosen_function() is None:
            raise FieldError("tool_choice", f"names function {self.tool_choice.name!r}, which is not among 'tools'")
        if self.tool_choice == "required" and not functions:
            raise FieldError("tool_choice", "'required' needs at least one tool")
        return self

    def functions(self) -> list[tuple[str, str | None, FunctionTool]]:
        """Every function tool as (the name the model calls it by, its namespace or None, the tool)."""
        found: list[tuple[str, str | None, FunctionTool]] = []
        for tool in self.tools or []:
            if isinstance(tool, FunctionTool):
                found.append((tool.name, None, tool))
            elif isinstance(tool, NamespaceTool):
                found += [(namespaced_name(tool.name, f.name), tool.name, f) for f in tool.tools]
        return found

    def hosted_tools(self) -> list[str]:
        """`tools.i (type)` of each tool left out: the ones that do not run on this server."""
        return [f"tools.{i} ({tool.type})" for i, tool in enumerate(self.tools or []) if isinstance(tool, HostedTool)]

    def chosen_function(self) -> str | None:
        """The model's name of the function `tool_choice` names, or None."""
        choice = self.tool_choice
        if not isinstance(choice, FunctionChoice):
            return None
        wanted = namespaced_name(choice.namespace, choice.name) if choice.namespace else choice.name
        matches = [name for name, namespace, tool in self.functions()
                   if name == wanted or (choice.namespace is None and namespace and tool.name == choice.name)]
        return matches[0] if len(matches) == 1 else None


# ---- response ----------------------------------------------------------------------------------

class OutputText(BaseModel):
    """The text of an answer message."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    """The model's reasoning, as it wrote it."""

    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    """The answer's text."""

    id: str
    type: Literal["message"] = "message"
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputReasoning(BaseModel):
    """The model's reasoning (`content`; there is no separate summary: `summary` stays empty)."""

    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]
    status: ItemStatus


class OutputFunctionCall(BaseModel):
    """A function call the model made; answer it with a `function_call_output` item of its `call_id`. A call
    of a namespace's function names the function and its `namespace` apart (absent otherwise)."""

    id: str
    type: Literal["function_call"] = "function_call"
    status: ItemStatus
    call_id: str
    name: str
    arguments: str
    namespace: str | None = Field(None, exclude_if=lambda value: value is None)


OutputItem = Annotated[Union[OutputReasoning, OutputMessage, OutputFunctionCall], Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    """Prompt tokens the prefix cache spared."""

    cached_tokens: int


class OutputTokensDetails(BaseModel):
    """Output tokens spent on reasoning."""

    reasoning_tokens: int


class ResponseUsage(BaseModel):
    """Token counts of one response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    """Why a response failed."""

    code: str
    message: str


class ResponseObject(BaseModel):
    """A response (`object: "response"`), whole or as a stream's lifecycle events carry it; the request's
    settings are repeated as OpenAI does."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: dict[str, Any]
    store: bool = False
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


StreamEventType = Literal[
    "response.created", "response.in_progress", "response.output_item.added", "response.output_item.done",
    "response.content_part.added", "response.content_part.done", "response.output_text.delta",
    "response.output_text.done", "response.reasoning_text.delta", "response.reasoning_text.done",
    "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.completed",
    "response.incomplete", "response.failed"]


class ResponseStreamEvent(BaseModel):
    """One event of a streamed response; `type` names it (and is the SSE `event:` field). Keys that do not
    belong to an event's type are left out."""

    type: StreamEventType
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item_id: str | None = None
    content_index: int | None = None
    item: OutputItem | None = None
    part: OutputText | ReasoningText | None = None
    delta: str | None = None
    text: str | None = None
    name: str | None = None
    arguments: str | None = None
    logprobs: list[Any] | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}
