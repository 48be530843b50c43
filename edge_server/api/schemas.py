"""Pydantic request and response types with OpenAI wire names and field order."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from edge_server.api.bodylimits import check_body_shape, nesting_error
from edge_server.api.errors import APIError
from edge_server.engine.protocol import CompiledGrammarHandle
from edge_server.engine.types import IMAGE_MARKER, FinishReason, Sampling
from edge_server.generation.pipeline import TokenLogprob
from edge_server.generation.prompt import RESERVED_TEMPLATE_VARIABLES

# JSON has one number type: 1.0 is an integer to JSON Schema (and to OpenAI), but not to strict pydantic.
def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def whole_int(**bounds: int) -> Any:
    """An integer type that also takes whole floats like 5.0, with JSON-schema bounds (ge/lt...)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_whole_number)]
_TOKEN_ID = re.compile(r"\s*[0-9]{1,10}\s*")  # str.isdigit() would also accept "²" or "١٢"
MAX_STOP_CHARACTERS = 256  # per stop string: the stop buffer's work per token grows with its square
MAX_INTEGER_DIGITS = 40  # JSON integers longer than this are refused (int() of 4,300 digits raises)

_DEFAULTS = Sampling()  # the engine's defaults are the API's: written once, in engine/types.py

# The validators' checks are also stated as JSON Schema (`json_schema_extra`) for the OpenAPI document;
# tests/unit/test_openapi.py checks that the server and the document accept and reject the same bodies.
_NULL = {"type": "null"}


MAX_CHOICES = 128  # OpenAI's limit on n; also on a legacy completion's prompts
MAX_GRAMMAR_CHARACTERS = 65_536  # a `grammar` (GBNF) is read by a Python parser first; llama.cpp's own are ~1-5k
TokenId = whole_int(ge=0, lt=2**31)
_TOKEN_ID_SCHEMA = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def _given(*fields: str) -> dict[str, Any]:
    """JSON Schema: each of `fields` is present, a non-empty array."""
    return {"required": list(fields), "properties": {field: {"type": "array", "minItems": 1} for field in fields}}

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class RequestModel(BaseModel):
    """Base of every request body part: strict types, unknown fields kept, null read as not given."""

    # Strict: a string where a number belongs is a client bug worth a 400, not something to coerce.
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI reads null as "not given" for every optional field, and the openai SDK sends null
        # for a parameter a caller passes as None (temperature=None, n=None...).
        if not isinstance(data, dict):
            return data
        return {key: value for key, value in data.items()
                if value is not None or key not in cls.model_fields or cls.model_fields[key].is_required()}


class ImageURL(RequestModel):
    """An `image_url` part's image: a data URL (`detail` is accepted; the projector decides the resolution)."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


_IMAGE_PART = {"required": ["type", "image_url"], "properties": {
    "type": {"const": "image_url"}, "image_url": {"type": "object", "required": ["url"], "properties": {
        "url": {"type": "string", "description": "data:image/png;base64,... (PNG, JPEG, WebP or GIF)"},
        "detail": {"enum": ["auto", "low", "high"]}}}}}


class ContentPart(RequestModel):
    """One part of a list-form message content: text, or an image for a model that sees images."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [  # `_text_or_image`
        {"required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
        _IMAGE_PART]})

    type: str
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _text_or_image(self) -> ContentPart:
        if self.type not in ("text", "image_url"):
            raise ValueError(f"content part type {self.type!r} is not supported; this server accepts 'text' and "
                             f"'image_url' parts")
        if self.type == "text" and self.text is None:
            raise ValueError("a 'text' content part needs a 'text' string")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an 'image_url' content part needs an 'image_url' object with a 'url'")
        return self

    def rendered(self) -> str:
        """The part as prompt text: its text, or the marker where its image goes."""
        return IMAGE_MARKER if self.type == "image_url" else self.text or ""


_CALLED_FUNCTION = {"type": "object", "required": ["name", "arguments"], "properties": {  # `_called_function`
    "name": {"type": "string", "minLength": 1},
    "arguments": {"type": ["string", "object"], "description": "a JSON string (or the object itself)"}}}


class ChatMessage(RequestModel):
    """One conversation turn as the client sent it."""

    # An assistant turn's calls go through the chat template, which needs each call's function name and
    # arguments (legacy `function_call` counts only when there are no `tool_calls`); other roles' are ignored.
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["role"], "properties": {"role": {"const": "assistant"}}},
        "then": {
            "properties": {"tool_calls": {"anyOf": [{"type": "array", "items": {
                "type": "object", "required": ["function"], "properties": {"function": _CALLED_FUNCTION}}}, _NULL]}},
            "if": _given("tool_calls"),
            "else": {"properties": {"function_call": {"anyOf": [{"type": "object", "maxProperties": 0},
                                                                _CALLED_FUNCTION, _NULL]}}},
        },
    })

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    reasoning_content: str | None = None  # an earlier answer's reasoning, handed back to the template
    reasoning: str | None = None  # the same under vLLM's and Ollama's name

    def text(self) -> str:
        """The content as one string (text parts joined, null as empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.rendered() for part in self.content)


class StreamOptions(RequestModel):
    """`stream_options`: only `include_usage` has a meaning."""

    include_usage: bool = False


_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARACTERS}


class GenerationRequest(RequestModel):
    """The fields chat and legacy completion requests share, and their translation into engine `Sampling`."""

    model: str | None = None
    max_tokens: whole_int(ge=1) | None = None
    temperature: float = Field(_DEFAULTS.temperature, ge=0.0, le=2.0)
    top_p: float = Field(_DEFAULTS.top_p, gt=0.0, le=1.0)
    top_k: whole_int(ge=0) = _DEFAULTS.top_k
    min_p: float = Field(_DEFAULTS.min_p, ge=0.0, le=1.0)
    presence_penalty: float = Field(_DEFAULTS.presence_penalty, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(_DEFAULTS.frequency_penalty, ge=-2.0, le=2.0)
    repeat_penalty: float = Field(_DEFAULTS.repeat_penalty, ge=0.01, le=10.0)
    seed: whole_int(ge=-(2**63), lt=2**64) | None = None
    stop: str | list[str] | None = Field(None, json_schema_extra={"anyOf": [
        _STOP, {"type": "array", "items": _STOP, "maxItems": 16}, _NULL]},
        description=f"a stop string or up to 16; none may be empty or longer than {MAX_STOP_CHARACTERS} characters")
    n: whole_int(ge=1, le=MAX_CHOICES) = Field(1, description="choices to generate (at most --parallel), each with "
                                                               "its own sampler; with a seed, choice i uses seed + i")
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "object", "propertyNames": {"pattern": f"^{_TOKEN_ID.pattern}$"},
         "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}, _NULL]},
        description="token id (a whole number as a string, below the model's vocabulary size) -> bias between "
                    "-100 and 100")
    user: str | None = None
    speculative: bool = Field(True, description="extension: false turns speculative decoding off for this request "
                                                "(when the server runs with --spec-type)")
    grammar: str | None = Field(None, max_length=MAX_GRAMMAR_CHARACTERS,
                                description="extension (llama.cpp's): a GBNF grammar (root rule `root`) the output "
                                            "must match; not with a JSON response_format or callable tools")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(stop) > MAX_STOP_CHARACTERS for stop in stops):
            raise ValueError(f"stop strings may have at most {MAX_STOP_CHARACTERS} characters")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids (whole numbers as strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {bias} for token {key}")
        return value

    def sampling(self, n_vocab: int, grammar: CompiledGrammarHandle | None = None) -> Sampling:
        """The engine's sampler settings for this request; a 400 for a logit_bias token beyond the vocabulary."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            token = int(key)
            if token >= n_vocab:
                raise APIError(f"logit_bias names token {token}, but the vocabulary has {n_vocab} tokens.",
                               param="logit_bias", code="invalid_value")
            bias[token] = value
        return Sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                        presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                        repeat_penalty=self.repeat_penalty, seed=self.seed, logit_bias=bias, grammar=grammar,
                        logprobs=self.logprob_count())

    def logprob_count(self) -> int | None:
        """How many top alternatives to report per token, or None for no log-probabilities."""
        return None

    def stop_list(self) -> list[str]:
        """The stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


_FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"
MAX_TOOLS = 128  # OpenAI's own limit


class FunctionDefinition(RequestModel):
    """A function the model may call: its name, description and JSON-schema parameters."""

    name: str = Field(pattern=_FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "object", "additionalProperties": True, "properties": {"type": {"const": "object"}}}, _NULL]},
        description="a JSON schema of type object")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema_object(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "object") != "object":
            raise ValueError("parameters must be a JSON schema of type 'object'")
        return value


class ToolDefinition(RequestModel):
    """One entry of `tools`."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    """`{"name": ...}` naming one function."""

    name: str


class NamedToolChoice(RequestModel):
    """`tool_choice: {"type": "function", "function": {"name": ...}}`."""

    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(RequestModel):
    """`response_format.json_schema`."""

    model_config = ConfigDict(strict=True, extra="allow", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """`response_format`: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(json_schema_extra={  # `_schema_given`
        "if": {"properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


def _no_reserved_variables(value: dict[str, Any]) -> dict[str, Any]:
    clashes = sorted(set(value) & RESERVED_TEMPLATE_VARIABLES)
    if clashes:
        raise ValueError(f"may not set {', '.join(clashes)}: the server renders those itself")
    return value


TemplateKwargs = Annotated[dict[str, Any], AfterValidator(_no_reserved_variables)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


def template_variables(server_reasoning: str, effort: str | None = None,
                       client_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Variables for the chat template: the client's own over `reasoning_effort` over the server's
    `--reasoning` (on/off/auto; auto leaves the template's default)."""
    variables: dict[str, Any] = {}
    if server_reasoning != "auto":
        variables["enable_thinking"] = server_reasoning == "on"
    if effort is not None:
        variables["enable_thinking"] = effort != "none"
        variables["reasoning_effort"] = effort
    variables.update(client_kwargs or {})
    return variables


def _json_kind(value: Any) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _called_function(function: Any, where: str) -> None:
    """Raise `FieldError` (naming the field at `where`) unless `function` is a call a chat template can render:
    an object with a non-empty string `name` and `arguments` as a JSON string or an object."""
    if not isinstance(function, dict):
        raise FieldError(where, f"must be an object with 'name' and 'arguments', not {_json_kind(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise FieldError(f"{where}.name", "must not be empty" if name == "" else
                         f"must be the function's name as a string, not {_json_kind(name)}")
    if "arguments" not in function:
        raise FieldError(f"{where}.arguments", "is required: the call's arguments as a JSON string, e.g. '{}'")
    arguments = function["arguments"]
    if not isinstance(arguments, (str, dict)):
        raise FieldError(f"{where}.arguments", f"must be a JSON string (or an object), not {_json_kind(arguments)}")


class ChatCompletionRequest(GenerationRequest):
    """Body of POST /v1/chat/completions.

    A named `tool_choice` / `function_call` must name one of the request's functions; a schema in
    `response_format` is enforced as written, `strict` or not."""

    # What `_choices_name_known_functions` checks, as far as JSON Schema can say it.
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"not": _given("tools", "functions")},
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [{"const": "required"},
                                                                                       {"type": "object"}]}}},
         "then": {"anyOf": [_given("tools"), _given("functions")]}},
        {"if": {"required": ["function_call"], "properties": {"function_call": {"type": "object"}}},
         "then": {"anyOf": [_given("tools"), _given("functions")]}},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: whole_int(ge=1) | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[FunctionDefinition] | None = Field(None, max_length=MAX_TOOLS)
    function_call: Literal["none", "auto"] | FunctionName | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: TemplateKwargs | None = None
    reasoning_effort: ReasoningEffort | None = None
    logprobs: bool = False
    top_logprobs: whole_int(ge=0, le=20) | None = Field(None, description="needs `logprobs: true`")

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "needs 'logprobs': true")
        return self

    def logprob_count(self) -> int | None:
        """How many top alternatives to report per token, or None for no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_kwargs(self, server_reasoning: str) -> dict[str, Any]:
        """Variables for this request's chat template (see `template_variables`)."""
        return template_variables(server_reasoning, self.reasoning_effort, self.chat_template_kwargs)

    @model_validator(mode="after")
    def _choices_name_known_functions(self) -> ChatCompletionRequest:
        if self.tools and self.functions:
            raise ValueError("send either 'tools' or the legacy 'functions', not both")
        names = {f.name for f in self.function_definitions()}
        for param, choice in (("tool_choice", self.tool_choice), ("function_call", self.function_call)):
            named = choice.function.name if isinstance(choice, NamedToolChoice) else getattr(choice, "name", None)
            if named is not None and named not in names:
                raise FieldError(param, f"names function {named!r}, which is not among the request's functions")
            if choice in ("required",) and not names:
                raise FieldError(param, "'required' needs at least one tool")
        return self

    @model_validator(mode="after")
    def _history_calls_are_well_formed(self) -> ChatCompletionRequest:
        # The template renders every call of an assistant turn: a malformed one is the client's 400, not a 500.
        for index, message in enumerate(self.messages):
            if message.role != "assistant":
                continue
            if message.tool_calls:
                for number, call in enumerate(message.tool_calls):
                    _called_function(call.get("function"), f"messages.{index}.tool_calls.{number}.function")
            elif message.function_call:
                _called_function(message.function_call, f"messages.{index}.function_call")
        return self

    def function_definitions(self) -> list[FunctionDefinition]:
        """The callable functions, from `tools` or the legacy `functions`."""
        if self.tools:
            return [tool.function for tool in self.tools]
        return list(self.functions or [])

    def token_limit(self) -> int | None:
        """The client's completion limit (the newer `max_completion_tokens` wins)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    """Body of POST /v1/completions (legacy prompt completion)."""

    prompt: str | list[Annotated[str, Field(min_length=1)]] | list[TokenId] | list[list[TokenId]] = Field(
        json_schema_extra={"anyOf": [  # routes refuse "" and empty token lists
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_CHOICES},
            {"type": "array", "items": _TOKEN_ID_SCHEMA, "minItems": 1},
            {"type": "array", "items": {"type": "array", "items": _TOKEN_ID_SCHEMA, "minItems": 1}, "minItems": 1,
             "maxItems": MAX_CHOICES}]},
        description="a prompt (text or token ids), or a list of them: one choice per prompt (times n)")
    max_tokens: whole_int(ge=1) | None = 16
    echo: bool = False
    logprobs: whole_int(ge=0, le=5) | None = Field(None, description="the log-probabilities of each token and of "
                                                                        "this many likeliest alternatives")
    suffix: str | None = Field(None, json_schema_extra={"anyOf": [{"type": "string", "maxLength": 0}, _NULL]},
                               description="not supported: a non-empty suffix is a 400")

    @field_validator("prompt")
    @classmethod
    def _prompts_given(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value or any(isinstance(item, list) and not item for item in value):
                raise ValueError("prompts must not be empty")
            if not isinstance(value[0], int) and len(value) > MAX_CHOICES:
                raise ValueError(f"at most {MAX_CHOICES} prompts per request")
        return value

    def prompt_list(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def logprob_count(self) -> int | None:
        """How many top alternatives to report per token, or None for no log-probabilities."""
        return self.logprobs

    def token_limit(self) -> int | None:
        """The client's completion limit."""
        return self.max_tokens


# ---- responses -------------------------------------------------------------------------------

# The wire's share of the one finish-reason type (cancelled and failed generations never reach a choice).
WireFinishReason = Literal[FinishReason.STOP, FinishReason.LENGTH, FinishReason.TOOL_CALLS, FinishReason.FUNCTION_CALL]


def completion_id(prefix: str = "chatcmpl") -> str:
    """A fresh response id such as `chatcmpl-...`."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix seconds for `created`."""
    return int(time.time())


class _Sparse(BaseModel):
    """A wire object whose unset (None) keys are left out, as OpenAI's deltas do."""

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class PromptTokensDetails(BaseModel):
    """What the prompt tokens were: how many the prefix cache served without evaluating them."""

    cached_tokens: int


class CompletionTokensDetails(BaseModel):
    """What the completion tokens were spent on."""

    reasoning_tokens: int


class Usage(_Sparse):
    """Token counts of one request (`completion_tokens_details` only where the output was split)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, reasoning_tokens: int | None = None,
           cached_tokens: int = 0) -> Usage:
        """Usage with the total filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            completion_tokens_details=(None if reasoning_tokens is None
                                       else CompletionTokensDetails(reasoning_tokens=reasoning_tokens)),
        )


class FunctionCall(BaseModel):
    """A function's name and JSON arguments string."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call of a non-streamed answer."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Sparse):
    """The assistant turn of a non-streamed answer (`content` stays, even when null)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {key: value for key, value in data.items() if value is not None or key == "content"}


class TopLogprob(BaseModel):
    """One of the likeliest tokens at a position."""

    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    """A generated token's log-probability and the likeliest alternatives at its position."""

    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    """`choices[].logprobs` of a chat answer or chunk: the content's tokens."""

    content: list[ChatTokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, entries: list[TokenLogprob]) -> ChoiceLogprobs:
        """From the pipeline's per-token entries."""
        return cls(content=[ChatTokenLogprob(token=e.text, logprob=e.logprob, bytes=e.bytes, top_logprobs=[
            TopLogprob(token=text, logprob=logprob, bytes=raw) for text, raw, logprob in e.top]) for e in entries])


class CompletionLogprobs(BaseModel):
    """`choices[].logprobs` of a legacy completion."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def of(cls, entries: list[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        """From the pipeline's per-token entries; `offset` is where the first token's text starts."""
        offsets = []
        for entry in entries:
            offsets.append(offset)
            offset += len(entry.text)
        return cls(tokens=[e.text for e in entries], token_logprobs=[e.logprob for e in entries],
                   top_logprobs=[{text: logprob for text, _, logprob in e.top} for e in entries], text_offset=offsets)


class ChatChoice(BaseModel):
    """The one choice of a non-streamed chat answer."""

    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: WireFinishReason


class ChatCompletion(BaseModel):
    """A non-streamed chat answer (`chat.completion`)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(_Sparse):
    """A piece of a function call: the name once, then argument fragments."""

    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Sparse):
    """A piece of one tool call; only the first piece of a call has `id`, `type` and the name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(_Sparse):
    """What one chunk adds; absent keys are left out on the wire (a null `content` breaks the spec's clients)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionDelta | None = None


class ChunkChoice(BaseModel):
    """The one choice of a streamed chunk."""

    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: WireFinishReason | None = None


class _UsageWhenSet(BaseModel):
    """A response whose `usage` key is left out unless set (only the last chunk of a stream carries it)."""

    usage: Usage | None = None

    @model_serializer(mode="wrap")
    def _usage_only_when_set(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        usage = data.pop("usage", None)
        if usage is not None:
            data["usage"] = usage  # last, where OpenAI puts it
        return data


class ChatCompletionChunk(_UsageWhenSet):
    """One streamed chunk (`chat.completion.chunk`); the usage chunk has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    """The one choice of a legacy completion (streamed or not)."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: WireFinishReason | None = None


class TextCompletion(_UsageWhenSet):
    """A legacy completion answer or chunk (`text_completion`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "edge-server"
    meta: dict[str, Any] = Field(default_factory=dict)


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class FieldError(ValueError):
    """A cross-field check that names the field at fault (pydantic would blame the whole body)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# ---- request decoding ------------------------------------------------------------------------

_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param_path(loc: tuple[Any, ...]) -> str:
    # Union members show up in the location as tags like "str" or "list[ContentPart]"; they name no field.
    parts = [str(part) for part in loc if not (isinstance(part, str) and (part in _UNION_TAGS or "[" in part))]
    return ".".join(parts)


def _most_useful_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    # A union reports one error per member; the member's own check (value_error) says what is wrong.
    for error in errors:
        if error["type"] == "value_error":
            return error
    # A member refused whole (a string expected where a list of blocks came) says less than the one member
    # that got inside the value, which names the field at fault.
    inside = [error for error in errors if not _refused_member(error)]
    if inside and len({_member(error) for error in inside}) == 1:
        errors = inside
    return min(errors, key=lambda error: len(error["loc"]))


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "[" in part)


def _refused_member(error: dict[str, Any]) -> bool:
    return bool(error["loc"]) and _is_union_tag(error["loc"][-1]) and error["type"].endswith("_type")


def _member(error: dict[str, Any]) -> tuple[Any, ...]:
    """The location up to the first union member the error is in."""
    loc = error["loc"]
    return next((loc[:index + 1] for index, part in enumerate(loc) if _is_union_tag(part)), loc)


class _IntegerTooLong(ValueError):
    """A JSON integer literal too long to be any field's value."""


def _bounded_int(literal: str) -> int:
    if len(literal.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _IntegerTooLong
    return int(literal)


def parse_body(model: type[BaseModel], raw: bytes) -> Any:
    """Decode and validate a JSON request body, raising a 400 `APIError` that names the bad field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise APIError(f"Request body is not valid UTF-8 (byte {error.start}).", code="invalid_encoding") from None
    if not text.strip():
        raise APIError("Request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as error:
        raise APIError(f"Request body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}.",
                       code="invalid_json") from None
    except RecursionError:
        raise nesting_error() from None
    except _IntegerTooLong:
        raise APIError(f"Request body has an integer of more than {MAX_INTEGER_DIGITS} digits.",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(f"Request body must be a JSON object, got {type(data).__name__}.", code="invalid_json")
    check_body_shape(data)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        cause = next((e["ctx"]["error"] for e in error.errors() if isinstance(e.get("ctx", {}).get("error"), FieldError)),
                     None)
        if cause is not None:
            raise APIError(f"Invalid '{cause.param}': {cause}.", param=cause.param, code="invalid_value") from None
        first = _most_useful_error(error.errors(include_url=False))
        param = _param_path(first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "is required"
        raise APIError(f"Invalid '{param}': {message}." if param else f"{message}.", param=param or None,
                       code="invalid_value") from None
