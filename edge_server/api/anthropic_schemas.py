"""Wire models of the Anthropic Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`): requests as
Anthropic's SDK sends them, answers and errors as it reads them. `api/anthropic_api.py` translates them."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edge_server.api.schemas import MAX_STOP_CHARACTERS, MAX_TOOLS, RequestModel, whole_int

# Block types no model here reads: a clear 400 instead of "does not match any of the expected tags".
_NOT_READABLE = {"document": "documents", "search_result": "search results", "container_upload": "container uploads"}


def _refuse_unreadable_blocks(value: Any, allowed: tuple[str, ...], where: str) -> Any:
    """Refuse blocks other than `allowed` by name, before the tagged union sees them."""
    for block in value if isinstance(value, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(kind, str) or kind in allowed:
            continue
        if kind in _NOT_READABLE:
            raise ValueError(f"'{kind}' blocks are not supported: the served models read text and images, "
                             f"not {_NOT_READABLE[kind]}")
        if kind == "image":
            raise ValueError(f"'image' blocks are not supported in {where}; put the image in the user "
                             f"message's own content")
        raise ValueError(f"block type {kind!r} is not supported in {where}; use {', '.join(map(repr, allowed))}")
    return value


class TextBlock(RequestModel):
    """`{"type": "text", "text": ...}` (`cache_control`, `citations` are accepted and ignored)."""

    type: Literal["text"]
    text: str


class Base64Source(RequestModel):
    """An image inline: base64 `data` of type `media_type` (checked against the bytes)."""

    type: Literal["base64"]
    media_type: str
    data: str

    def url(self) -> str:
        """The image as a data URL."""
        return f"data:{self.media_type};base64,{self.data}"


class URLSource(RequestModel):
    """An image by URL: fetched only by a server started with --allow-image-urls."""

    type: Literal["url"]
    url: str


class ImageBlock(RequestModel):
    """An image in a user turn, for a model that sees images (`base64` or `url` source; `file` is refused)."""

    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]

    @field_validator("source", mode="before")
    @classmethod
    def _no_files(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") == "file":
            raise ValueError("images by 'file' source are not supported: this server keeps no files; send a "
                             "'base64' source")
        return value

    def url(self) -> str:
        """The image as a data URL or the URL it names."""
        return self.source.url() if isinstance(self.source, Base64Source) else self.source.url


class ToolUseBlock(RequestModel):
    """An earlier assistant turn's tool call."""

    type: Literal["tool_use"]
    id: str
    name: str = Field(min_length=1)  # the template renders the call by its name
    input: dict[str, Any]


class ToolResultBlock(RequestModel):
    """A tool's answer, in a user turn; `is_error` marks a failed call."""

    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        return _refuse_unreadable_blocks(value, ("text",), "a tool_result")

    def text(self) -> str:
        """The result as one string, marked when the call failed."""
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content or [])
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(RequestModel):
    """An earlier answer's thinking, handed back (to the template as `reasoning_content`)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(RequestModel):
    """Redacted thinking of another server's answer: accepted and left out (nothing readable in it)."""

    type: Literal["redacted_thinking"]
    data: str | None = None


USER_BLOCKS = ("text", "image", "tool_result")
ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")
SYSTEM_BLOCKS = ("text",)
ContentBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
                         Field(discriminator="type")]


class InputMessage(RequestModel):
    """One turn: a string or content blocks (text, image and tool_result from the user; text, tool_use and
    thinking from the assistant; text in a `system` message, which Claude Code sends mid-conversation)."""

    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _known_blocks(cls, value: Any) -> Any:
        return _refuse_unreadable_blocks(value, tuple(dict.fromkeys(USER_BLOCKS + ASSISTANT_BLOCKS)), "a message")

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> InputMessage:
        allowed = {"user": USER_BLOCKS, "assistant": ASSISTANT_BLOCKS, "system": SYSTEM_BLOCKS}[self.role]
        for block in self.content if isinstance(self.content, list) else ():
            if block.type not in allowed:
                raise ValueError(f"a {self.role} message may not hold {block.type!r} blocks "
                                 f"(only {', '.join(map(repr, allowed))})")
        return self


_TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class Tool(RequestModel):
    """A client tool: name, description and the JSON schema of its `input`. Anthropic's server tools
    (web search, code execution, computer use...) have other types and are refused."""

    name: str = Field(pattern=_TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any] = Field(json_schema_extra={
        "type": "object", "additionalProperties": True, "properties": {"type": {"const": "object"}}},
        description="a JSON schema of type object")
    type: Literal["custom"] | None = Field(None, description="only client tools ('custom'); server tools are refused")

    @field_validator("input_schema")
    @classmethod
    def _schema_object(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type", "object") != "object":
            raise ValueError("input_schema must be a JSON schema of type 'object'")
        return value


class ToolChoice(RequestModel):
    """`auto` (the default), `any` (some tool must be called), `tool` (that one) or `none`."""

    model_config = ConfigDict(json_schema_extra={"if": {"properties": {"type": {"const": "tool"}}},  # `_named`
                                                 "then": {"required": ["name"]}})

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and self.name is None:
            raise ValueError("type 'tool' needs the tool's 'name'")
        return self


class ThinkingConfig(RequestModel):
    """`enabled` or `adaptive` turn the template's thinking on, `disabled` off; without it the server's
    --reasoning decides. `budget_tokens` ends the thinking after that many tokens (the server closes the block)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: whole_int(ge=1) | None = None


class OutputConfig(RequestModel):
    """`output_config`: `effort` turns thinking on as `reasoning_effort` does (`max` as `xhigh`); a JSON
    `format` is accepted and ignored."""

    effort: Literal["low", "medium", "high", "max"] | None = None


_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARACTERS}


class CountTokensRequest(RequestModel):
    """Body of POST /v1/messages/count_tokens: what is rendered into the prompt."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _system_text(cls, value: Any) -> Any:
        return _refuse_unreadable_blocks(value, ("text",), "'system'")

    def system_text(self) -> str | None:
        """The system prompt as one string (text blocks joined by blank lines)."""
        if self.system is None or isinstance(self.system, str):
            return self.system
        return "\n\n".join(block.text for block in self.system)


class MessagesRequest(CountTokensRequest):
    """Body of POST /v1/messages. A `tool_choice` of type `tool` must name one of `tools`, and `any`/`tool`
    need tools; the last message must be the user's (continuing an assistant turn is not supported)."""

    max_tokens: whole_int(ge=1)
    stop_sequences: list[str] | None = Field(None, max_length=16, json_schema_extra={"items": _STOP},
                                             description="up to 16 non-empty strings")
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: whole_int(ge=0) | None = None
    metadata: dict[str, Any] | None = None
    context_management: dict[str, Any] | None = Field(None, description="accepted; the server keeps no context "
                                                                        "to edit (each request is whole)")
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, value: list[str] | None) -> list[str] | None:
        if any(not stop or len(stop) > MAX_STOP_CHARACTERS for stop in value or []):
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_CHARACTERS} characters")
        return value


# ---- answers -------------------------------------------------------------------------------------

def message_id() -> str:
    """A fresh `msg_...` id."""
    return f"msg_{uuid.uuid4().hex[:24]}"


class TextContent(BaseModel):
    """Answer text."""

    type: Literal["text"] = "text"
    text: str


class ThinkingContent(BaseModel):
    """The model's reasoning; `signature` is empty (nothing here signs or checks it)."""

    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class ToolUseContent(BaseModel):
    """A tool call: its id (`toolu_...`), the tool's name and the input object."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class MessageUsage(BaseModel):
    """Tokens: `input_tokens` excludes the prompt tokens the prefix cache spared (`cache_read_input_tokens`)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(BaseModel):
    """A whole answer (`"type": "message"`); in a stream's `message_start` with no content and no stop_reason."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ThinkingContent | TextContent | ToolUseContent]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: MessageUsage


class TokenCount(BaseModel):
    """POST /v1/messages/count_tokens: the prompt's tokens as the server would render them."""

    input_tokens: int


class AnthropicError(BaseModel):
    """What went wrong."""

    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                                  "request_too_large, rate_limit_error, api_error or overloaded_error")
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error envelope, for every error of the /v1/messages routes (and a stream's `error` event)."""

    type: Literal["error"] = "error"
    error: AnthropicError
