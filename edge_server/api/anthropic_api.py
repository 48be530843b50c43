"""The Anthropic Messages API: `POST /v1/messages` and `/v1/messages/count_tokens`, translated onto a chat
request (api/submit.py runs it) and answered in Anthropic's shapes: a whole `message`, or its event sequence
(message_start, content_block_start/delta/stop, message_delta, message_stop, ping, error). Every error of
these routes, wherever it is raised (auth, body limits, validation, the engine), leaves in Anthropic's
error envelope (`_anthropic_errors`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any

from flask import Blueprint, Response
from flask import request as raw_request
from pydantic import BaseModel, ValidationError

from edge_server.api import sse
from edge_server.api.anthropic_schemas import (
    AnthropicErrorResponse,
    CountTokensRequest,
    InputMessage,
    Message,
    MessagesRequest,
    MessageUsage,
    StopReason,
    TextContent,
    ThinkingContent,
    TokenCount,
    ToolUseContent,
    message_id,
)
from edge_server.api.declaration import Reply, documented
from edge_server.api.errors import APIError, generation_failure
from edge_server.api.observability import Accounting
from edge_server.api.schemas import ChatCompletionRequest, parse_body
from edge_server.api.serialize import accounted_events, collect_accounted
from edge_server.api.state import state_of
from edge_server.api.submit import ChatRun, event_stream, log_unknown_fields, render_chat, start_chat, whole_answer
from edge_server.dialects.calls import ContentDelta, ToolCallArguments, ToolCallStart
from edge_server.engine.types import FinishReason
from edge_server.generation.pipeline import QUIET, Outcome
from edge_server.generation.reasoning import ReasoningDelta

anthropic = Blueprint("anthropic", __name__)
MESSAGES_PATH = "/v1/messages"

# ---- errors: Anthropic's envelope on these routes -------------------------------------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}` for an HTTP status."""
    kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return AnthropicErrorResponse.model_validate({"error": {"type": kind, "message": message}}).model_dump()


def is_anthropic_path(path: str) -> bool:
    """Whether `path` is one of Anthropic's routes (or below them), whose errors take Anthropic's shape."""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


@anthropic.after_app_request
def _anthropic_errors(response: Response) -> Response:
    """Re-shape the server's one error envelope (errors.py) into Anthropic's on /v1/messages*: this catches
    errors raised before any view runs too (401, 404, 405, 413), which no blueprint handler would see.
    (http_server.py does the same for the errors waitress answers itself, such as a body over the limit.)"""
    if response.status_code < 400 or not response.is_json or not is_anthropic_path(raw_request.path):
        return response
    body = response.get_json(silent=True)
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body.get("type") != "error":
        message = str(body["error"].get("message", ""))
        response.set_data(sse.to_json(anthropic_error_body(response.status_code, message)))
    return response


def _error_replies(*statuses: int) -> dict[int, Reply]:
    descriptions = {400: "Invalid request (bad JSON or field, unsupported block, context exceeded).",
                    401: "Missing or wrong API key (only with --api-key).", 404: "No such model (several served).",
                    413: "Body larger than --max-body-bytes.",
                    429: "The queue is full (--max-queue).", 500: "Unexpected failure, or the generation failed.",
                    503: "The model is loading or the server is shutting down."}
    headers = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",)}
    return {status: Reply(descriptions[status], AnthropicErrorResponse, headers=headers.get(status, ()))
            for status in statuses}


# ---- request -> chat ------------------------------------------------------------------------------

def chat_request(request: CountTokensRequest, image_params: dict[str, str] | None = None) -> ChatCompletionRequest:
    """The chat request that renders and runs as `request` asks; 400s in Anthropic's terms. `image_params` gets
    the chat request's name of each image part -> the Anthropic request's."""
    turns = [turn for turn in request.messages if turn.role != "system"]
    if not turns or turns[-1].role != "user":
        raise APIError("The last message must be the user's: continuing an assistant turn (prefill) is not "
                       "supported.", param="messages")
    fields: dict[str, Any] = {"model": request.model, "messages": _chat_messages(request, image_params)}
    if request.tools:
        fields["tools"] = [{"type": "function", "function": {
            "name": tool.name, "description": tool.description, "parameters": tool.input_schema}}
            for tool in request.tools]
    if request.tool_choice is not None:
        fields.update(_tool_choice(request))
    if request.output_config is not None and request.output_config.effort is not None:
        fields["reasoning_effort"] = _EFFORTS[request.output_config.effort]
    if request.thinking is not None:  # over the effort: thinking disabled stays off
        fields["chat_template_kwargs"] = {"enable_thinking": request.thinking.type != "disabled"}
    if isinstance(request, MessagesRequest):
        sampled = {"temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k}
        fields.update({key: value for key, value in sampled.items() if value is not None})
        fields.update(max_tokens=request.max_tokens, stop=request.stop_sequences, stream=request.stream)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as error:  # what the chat request checks beyond ours (e.g. a tool's schema)
        first = error.errors(include_url=False)[0]
        raise APIError(f"Invalid request: {first['msg'].removeprefix('Value error, ')}.") from None


_EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "xhigh"}  # Anthropic's -> reasoning_effort


def thinking_budget(request: MessagesRequest) -> int | None:
    """The reasoning tokens after which the server closes the thinking block (`thinking.budget_tokens`)."""
    thinking = request.thinking
    return thinking.budget_tokens if thinking is not None and thinking.type == "enabled" else None


def _tool_choice(request: CountTokensRequest) -> dict[str, Any]:
    choice, names = request.tool_choice, [tool.name for tool in request.tools or []]
    if choice.type in ("any", "tool") and not names:
        raise APIError(f"tool_choice '{choice.type}' needs at least one tool in 'tools'.", param="tool_choice")
    if choice.type == "tool" and choice.name not in names:
        raise APIError(f"tool_choice names tool {choice.name!r}, which is not among 'tools'.", param="tool_choice.name")
    named = {"type": "function", "function": {"name": choice.name}}
    return {"tool_choice": {"auto": "auto", "any": "required", "none": "none"}.get(choice.type, named),
            "parallel_tool_calls": not choice.disable_parallel_tool_use}


def _chat_messages(request: CountTokensRequest, image_params: dict[str, str] | None) -> list[dict[str, Any]]:
    """system + turns as chat messages: tool_use -> assistant tool_calls, tool_result -> tool messages,
    thinking -> reasoning_content, image -> image_url parts (their names recorded in `image_params`)."""
    system = request.system_text()
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, turn in enumerate(request.messages):
        if turn.role == "system":  # the template renders it in place, or prompt.py merges it into the first
            text = turn.content if isinstance(turn.content, str) else "\n\n".join(b.text for b in turn.content)
            messages.append({"role": "system", "content": text})
        elif turn.role == "assistant":
            messages.extend(_assistant_turn(turn))
        else:
            _user_turn(turn, i, messages, {} if image_params is None else image_params)
    return messages


def _assistant_turn(turn: InputMessage) -> list[dict[str, Any]]:
    if isinstance(turn.content, str):
        return [{"role": "assistant", "content": turn.content}]
    blocks = turn.content
    message: dict[str, Any] = {"role": "assistant", "content": "".join(b.text for b in blocks if b.type == "text")}
    thinking = "".join(b.thinking for b in blocks if b.type == "thinking")
    if thinking:
        message["reasoning_content"] = thinking
    calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(
        b.input, ensure_ascii=False)}} for b in blocks if b.type == "tool_use"]
    if calls:
        message["tool_calls"] = calls
    return [message]


def _user_turn(turn: InputMessage, i: int, messages: list[dict[str, Any]], image_params: dict[str, str]) -> None:
    """Append user turn `i` to `messages`."""
    if isinstance(turn.content, str):
        messages.append({"role": "user", "content": turn.content})
        return
    parts: list[dict[str, Any]] = []
    added = len(messages)
    # Tool results become tool messages, in order, between the parts around them.
    for b, block in enumerate(turn.content):
        if block.type == "tool_result":
            if parts:
                messages.append({"role": "user", "content": parts})
                parts = []
            messages.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        elif block.type == "image":
            chat_param = f"messages[{len(messages)}].content[{len(parts)}].image_url"
            image_params[chat_param] = f"messages.{i}.content.{b}.source"
            parts.append({"type": "image_url", "image_url": {"url": block.url()}})
        else:
            parts.append({"type": "text", "text": block.text})
    if parts or len(messages) == added:
        messages.append({"role": "user", "content": parts})


def _stop_reason(outcome: Outcome) -> tuple[StopReason, str | None]:
    if outcome.finish_reason is FinishReason.LENGTH:
        return "max_tokens", None
    if outcome.finish_reason is FinishReason.TOOL_CALLS:
        return "tool_use", None
    if outcome.stop_sequence is not None:
        return "stop_sequence", outcome.stop_sequence
    return "end_turn", None


def _usage(outcome: Outcome) -> MessageUsage:
    return MessageUsage(input_tokens=outcome.prompt_tokens - outcome.cached_tokens,
                        output_tokens=outcome.completion_tokens, cache_read_input_tokens=outcome.cached_tokens)


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


# ---- answers ---------------------------------------------------------------------------------------

def message_answer(run: ChatRun, account: Accounting) -> Message:
    """The whole `message` once the generation has ended."""
    collected = collect_accounted(run.generation, account)
    content: list[ThinkingContent | TextContent | ToolUseContent] = []
    if collected.reasoning:
        content.append(ThinkingContent(thinking=collected.reasoning))
    if collected.content and collected.content.strip():
        content.append(TextContent(text=collected.content))
    content += [ToolUseContent(id=_tool_use_id(call.id), name=call.name, input=_tool_input(call.arguments))
                for call in collected.calls]
    outcome = run.generation.outcome
    stop_reason, stop_sequence = _stop_reason(outcome)
    return Message(id=message_id(), model=run.model, content=content, stop_reason=stop_reason,
                   stop_sequence=stop_sequence, usage=_usage(outcome))


def _event(name: str, payload: BaseModel | dict[str, Any]) -> bytes:
    """One named SSE event: `event: <name>` then its `data:` line."""
    return f"event: {name}\n".encode() + sse.event(payload)


_PING = _event("ping", {"type": "ping"})


class _Blocks:
    """The content blocks of a streamed answer, opened and closed as the kind of event changes."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None
        self.blank = ""  # white space before any text: dropped when no text follows (as whole answers do)

    def add(self, event: Any) -> Iterator[bytes]:
        """The events for one pipeline event."""
        if isinstance(event, ReasoningDelta):
            yield from self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            yield self._delta({"type": "thinking_delta", "thinking": event.text})
        elif isinstance(event, ContentDelta):
            if self.kind != "text" and not event.text.strip():
                self.blank += event.text
                return
            text = self.blank + event.text
            yield from self._open("text", {"type": "text", "text": ""})
            yield self._delta({"type": "text_delta", "text": text})
        elif isinstance(event, ToolCallStart):
            yield from self._open("tool_use", {"type": "tool_use", "id": _tool_use_id(event.id), "name": event.name,
                                               "input": {}}, always=True)
        elif isinstance(event, ToolCallArguments):
            yield self._delta({"type": "input_json_delta", "partial_json": event.fragment})

    def close(self) -> Iterator[bytes]:
        """`content_block_stop` of the open block, if any."""
        if self.kind is not None:
            yield _event("content_block_stop", {"type": "content_block_stop", "index": self.index})
            self.kind = None

    def _open(self, kind: str, block: dict[str, Any], *, always: bool = False) -> Iterator[bytes]:
        if self.kind == kind and not always:
            return
        yield from self.close()
        self.index, self.kind, self.blank = self.index + 1, kind, ""
        yield _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                             "content_block": block})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})


def message_stream(run: ChatRun, account: Accounting, *,
                   heartbeat_seconds: float) -> Iterator[bytes]:
    """Anthropic's event sequence for a running generation; `ping` in quiet spells, `error` if it fails."""
    generation, outcome = run.generation, run.generation.outcome
    start = Message(id=message_id(), model=run.model, content=[], stop_reason=None,
                    usage=MessageUsage(input_tokens=outcome.prompt_tokens, output_tokens=0))
    yield _event("message_start", {"type": "message_start", "message": start.model_dump()})
    blocks = _Blocks()
    with closing(accounted_events(generation, heartbeat_seconds, account)) as events:
        for event in events:
            if event is QUIET:
                yield _PING
            else:
                yield from blocks.add(event)
    if outcome.finish_reason is FinishReason.CANCELLED:  # the client left
        return
    if outcome.error:
        failure = generation_failure(outcome.error, outcome.error_code)
        yield _event("error", anthropic_error_body(failure.status, failure.message))
        return
    yield from blocks.close()
    stop_reason, stop_sequence = _stop_reason(outcome)
    usage = _usage(outcome).model_dump(exclude={"cache_creation_input_tokens"})
    yield _event("message_delta", {"type": "message_delta", "usage": usage,
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}})
    yield _event("message_stop", {"type": "message_stop"})


# ---- routes ----------------------------------------------------------------------------------------

MESSAGE_EVENTS = """\
Anthropic's event sequence, each event an `event: <name>` line and a `data: <JSON>` line:
`message_start` (the `Message` with empty `content`, `stop_reason` null), then per content block
(`thinking`, `text`, `tool_use`, in the order generated) `content_block_start`, `content_block_delta`s
(`thinking_delta`, `text_delta`, `input_json_delta`) and `content_block_stop`; then `message_delta`
(`delta: {stop_reason, stop_sequence}`, `usage`) and `message_stop`. `ping` events keep a quiet stream
alive; a generation that fails mid-stream ends with an `error` event (`AnthropicErrorResponse`)."""

_EVENT_NAMES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
                "message_stop", "ping", "error"]
# One event as an SSE client parses it ({"event", "data"}), as in openapi.py's streams without event names.
MESSAGE_EVENT_SCHEMA = {"type": "object", "required": ["event", "data"], "description": MESSAGE_EVENTS, "properties": {
    "event": {"enum": _EVENT_NAMES},
    "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {
        "type": "object", "required": ["type"], "properties": {"type": {"enum": _EVENT_NAMES}}}}}}

MESSAGE_EXAMPLES = {
    "simple": {"summary": "one user turn", "value": {
        "model": "qwen", "max_tokens": 64, "system": "Be brief.", "messages": [{"role": "user", "content": "Hello!"}]}},
    "tools": {"summary": "a tool the model may call", "value": {
        "model": "qwen", "max_tokens": 256, "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"name": "get_weather", "description": "Weather for a city", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]}},
}


@anthropic.post(MESSAGES_PATH)
@documented("createMessage", "generation", "Anthropic Messages API", {
    200: Reply("The answer: `application/json` (a `Message`), or `text/event-stream` when `stream` is true.",
               Message, media="text/event-stream", media_schema=MESSAGE_EVENT_SCHEMA),
    **_error_replies(400, 401, 404, 413, 429, 500, 503)}, body=MessagesRequest, examples=MESSAGE_EXAMPLES)
def create_message():
    """Anthropic `messages.create`, streamed (Anthropic's events) or whole."""
    request = parse_anthropic(MessagesRequest)
    image_params: dict[str, str] = {}
    with named_images(image_params):
        run = start_chat(chat_request(request, image_params), reasoning_budget=thinking_budget(request))
    account = Accounting()
    if request.stream:
        heartbeat = state_of().settings.heartbeat_seconds
        return event_stream(message_stream(run, account, heartbeat_seconds=heartbeat))
    return whole_answer(lambda: message_answer(run, account))


@anthropic.post(MESSAGES_PATH + "/count_tokens")
@documented("countMessageTokens", "generation", "Anthropic token counting", {
    200: Reply("The prompt's tokens, rendered as /v1/messages would render it.", TokenCount),
    **_error_replies(400, 401, 404, 413, 500, 503)}, body=CountTokensRequest)
def count_tokens():
    """The prompt tokens of a Messages request, through the same chat template; nothing is generated."""
    request = parse_anthropic(CountTokensRequest)
    image_params: dict[str, str] = {}
    with named_images(image_params):
        prompt = render_chat(chat_request(request, image_params), encode=False).prompt
    return TokenCount(input_tokens=len(prompt.tokens)).model_dump()


@contextmanager
def named_images(image_params: dict[str, str]) -> Iterator[None]:
    """An image's error names the Anthropic block (`messages.i.content.j.source`), in its message too: Anthropic's
    envelope has no `param`."""
    try:
        yield
    except APIError as error:
        if error.param in image_params:
            error.param = image_params[error.param]
            error.message = f"{error.param}: {error.message}"
        raise


def parse_anthropic(model: type[CountTokensRequest]) -> Any:
    """The validated body; unknown fields logged."""
    request = parse_body(model, raw_request.get_data(cache=False))
    log_unknown_fields(request)
    return request
