"""`POST /v1/responses`, the OpenAI Responses API, stateless: the request is translated into a chat
request, submitted through `submit.start_chat`, and its events are assembled into `response` output items
(reasoning, message, function calls), whole or streamed as the documented event sequence."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import Any, get_args

from flask import Blueprint
from flask import request as raw_request
from pydantic import ValidationError

from edge_server.api import sse
from edge_server.api.declaration import Reply, documented
from edge_server.api.docs import RESPONSES_EVENTS, RESPONSES_EXAMPLES
from edge_server.api.errors import APIError, generation_failure
from edge_server.api.observability import Accounting
from edge_server.api.responses_schemas import (
    UNSUPPORTED,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    IncompleteDetails,
    InputImage,
    InputText,
    InputTokensDetails,
    MessageItem,
    OutputFunctionCall,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseStreamEvent,
    StreamEventType,
    ResponseUsage,
    item_id,
    namespaced_name,
)
from edge_server.api.schemas import ChatCompletionRequest, now, parse_body
from edge_server.api.serialize import accounted_events, collect_accounted
from edge_server.api.state import state_of
from edge_server.api.submit import event_stream, log_unknown_fields, start_chat, whole_answer
from edge_server.dialects.calls import ContentDelta, Event, ToolCallArguments, ToolCallStart
from edge_server.dialects.schemalimits import SchemaRefused
from edge_server.engine.types import FinishReason
from edge_server.generation.pipeline import QUIET, Generation, Outcome
from edge_server.generation.prompt import TemplateRefused
from edge_server.generation.reasoning import ReasoningDelta

responses_api = Blueprint("responses", __name__)
log = logging.getLogger("edge_server")


# ---- request -> chat request --------------------------------------------------------------------

def chat_request(request: ResponsesRequest, image_params: dict[str, str] | None = None) -> ChatCompletionRequest:
    """The chat request that runs `request`; a 400 for what a stateless server cannot do. `image_params` gets
    the chat request's name of each image part -> the Responses request's."""
    given = {**(request.model_extra or {}), **request.model_dump(include={"previous_response_id", "background"})}
    for param, reason in UNSUPPORTED.items():
        if given.get(param) not in (None, False):
            raise APIError(f"'{param}' is not supported: {reason}.", param=param, code="unsupported_parameter")
    body: dict[str, Any] = {
        "model": request.model, "messages": chat_messages(request, image_params), "stream": request.stream,
        "max_completion_tokens": request.max_output_tokens, "temperature": request.temperature,
        "top_p": request.top_p, "user": request.user, "parallel_tool_calls": request.parallel_tool_calls,
        "reasoning_effort": request.reasoning.effort if request.reasoning else None,
    }
    skipped = request.hosted_tools()
    if skipped:
        log.warning("POST /v1/responses: left out tools that do not run on this server: %s", ", ".join(skipped))
    functions = request.functions()
    if functions:
        body["tools"] = [{"type": "function", "function": {
            **tool.model_dump(exclude={"type", "name"}, exclude_none=True), "name": name}}
            for name, _, tool in functions]
    if isinstance(request.tool_choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": request.chosen_function()}}
    elif request.tool_choice is not None and (functions or request.tool_choice == "none"):
        body["tool_choice"] = request.tool_choice
    text_format = request.text.format if request.text else None
    if text_format is not None and text_format.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": text_format.name or "response", "schema": text_format.schema_, "strict": text_format.strict}}
    elif text_format is not None:
        body["response_format"] = {"type": text_format.type}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as error:  # what the Responses request's own validation already ruled out
        raise APIError(f"Invalid request: {error.errors()[0]['msg']}.", code="invalid_value") from None


def chat_messages(request: ResponsesRequest, image_params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """`instructions` and `input` as chat messages: function calls join the assistant turn before them,
    their outputs become tool turns, and reasoning items the next assistant turn's reasoning; images become
    `image_url` parts (their names recorded in `image_params`)."""
    messages: list[dict[str, Any]] = []
    image_params = {} if image_params is None else image_params
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    items = [MessageItem(role="user", content=request.input)] if isinstance(request.input, str) else request.input
    reasoning: list[str] = []

    def assistant_turn(content: str | None) -> dict[str, Any]:
        turn = {"role": "assistant", "content": content}
        if reasoning:
            turn["reasoning_content"] = "".join(reasoning)
            reasoning.clear()
        messages.append(turn)
        return turn

    for k, item in enumerate(items):
        if isinstance(item, ReasoningItem):
            reasoning.append(item.text())
        elif isinstance(item, MessageItem):
            if item.role != "user" and item.has_images():
                j = next(j for j, part in enumerate(item.content) if isinstance(part, InputImage))
                raise APIError(f"Images go in user messages; input[{k}].content[{j}] is in a {item.role!r} message.",
                               param=f"input[{k}].content[{j}]", code="invalid_image")
            if item.role == "assistant":
                assistant_turn(item.text())
            elif item.has_images():
                messages.append({"role": item.role, "content": [
                    _chat_part(part, f"input[{k}].content[{j}]", f"messages[{len(messages)}].content[{j}].image_url",
                               image_params) for j, part in enumerate(item.content)]})
            else:
                messages.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            last = messages[-1] if messages and not reasoning else None
            turn = last if last is not None and last["role"] == "assistant" else assistant_turn(None)
            name = namespaced_name(item.namespace, item.name) if item.namespace else item.name
            turn.setdefault("tool_calls", []).append({"id": item.call_id, "type": "function", "function": {
                "name": name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    if not messages:
        raise APIError("'input' has nothing to answer: it holds only reasoning items.", param="input",
                       code="invalid_value")
    return messages


def _chat_part(part: InputText | InputImage, where: str, chat_param: str,
               image_params: dict[str, str]) -> dict[str, Any]:
    """A content part as chat's: text, or an `image_url` part (its name in chat recorded)."""
    if isinstance(part, InputText):
        return {"type": "text", "text": part.text}
    if part.file_id is not None:
        raise APIError("Images by 'file_id' are not supported: this server keeps no files; send 'image_url' as a "
                       "data URL (data:image/png;base64,...).", param=f"{where}.file_id", code="unsupported_parameter")
    if part.image_url is None:
        raise APIError("An 'input_image' part needs an 'image_url'.", param=f"{where}.image_url", code="invalid_value")
    image_params[chat_param] = f"{where}.image_url"
    return {"type": "image_url", "image_url": {"url": part.image_url}}


# The chat request's field names in the errors of the rooms below, as the Responses request calls them.
_PARAMS = {"messages": "input", "response_format": "text.format",
           "response_format.json_schema.schema": "text.format.schema"}


def _responses_param(param: str | None, image_params: dict[str, str]) -> str | None:
    return image_params.get(param) or _PARAMS.get(param, param) if param else param


@contextmanager
def responses_params(image_params: dict[str, str] | None = None) -> Iterator[None]:
    """Errors raised while the chat request starts, naming the Responses request's fields (`image_params`: the
    chat request's names of its images -> the Responses request's)."""
    image_params = {} if image_params is None else image_params
    try:
        yield
    except APIError as error:
        error.param = _responses_param(error.param, image_params)
        raise
    except SchemaRefused as error:
        raise APIError(error.message, param=_responses_param(error.param, image_params), code=error.code) from None
    except TemplateRefused as error:
        raise APIError(str(error), param="input", code="invalid_input") from None


# ---- events -> response ------------------------------------------------------------------------

class ResponseAssembler:
    """Builds one `response` from a generation's events, and the stream events that build it."""

    def __init__(self, request: ResponsesRequest, model: str):
        text_format = request.text.format if request.text and request.text.format else None
        choice = request.tool_choice or ("auto" if request.tools else "none")
        self.response = ResponseObject(
            id=item_id("resp"), created_at=now(), status="in_progress", instructions=request.instructions,
            max_output_tokens=request.max_output_tokens, model=model,
            parallel_tool_calls=request.parallel_tool_calls,
            reasoning={"effort": request.reasoning.effort if request.reasoning else None, "summary": None},
            temperature=request.temperature, top_p=request.top_p, user=request.user,
            text={"format": text_format.echo() if text_format else {"type": "text"}},
            tool_choice=choice.model_dump() if isinstance(choice, FunctionChoice) else choice,
            tools=[tool.model_dump() for tool in request.tools or []],
            metadata=request.metadata or {},
        )
        # The model's name of each namespace's function -> (its name, the namespace), for the calls it makes.
        self._namespaced = {name: (tool.name, namespace) for name, namespace, tool in request.functions() if namespace}
        self._sequence = 0
        self._open: OutputMessage | OutputReasoning | OutputFunctionCall | None = None
        self._space = ""  # whitespace not yet part of a message (dropped between items)

    def _event(self, type: str, **fields: Any) -> ResponseStreamEvent:
        event = ResponseStreamEvent(type=type, sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def _lifecycle(self, type: str) -> ResponseStreamEvent:
        return self._event(type, response=self.response.model_copy(deep=True))

    def start(self) -> list[ResponseStreamEvent]:
        """`response.created` and `response.in_progress`."""
        return [self._lifecycle("response.created"), self._lifecycle("response.in_progress")]

    def push(self, event: Event | ReasoningDelta) -> list[ResponseStreamEvent]:
        """The stream events of one generation event."""
        if isinstance(event, ReasoningDelta):
            return self._text_delta(OutputReasoning, event.text, "response.reasoning_text.delta")
        if isinstance(event, ContentDelta):
            if not isinstance(self._open, OutputMessage) and not event.text.strip():
                self._space += event.text
                return []
            text, self._space = self._space + event.text, ""
            return self._text_delta(OutputMessage, text, "response.output_text.delta")
        if isinstance(event, ToolCallStart):
            events = self._close()
            name, namespace = self._namespaced.get(event.name, (event.name, None))
            call = OutputFunctionCall(id=item_id("fc"), status="in_progress", call_id=event.id, name=name,
                                      namespace=namespace, arguments="")
            return events + self._add(call)
        assert isinstance(event, ToolCallArguments) and isinstance(self._open, OutputFunctionCall)
        self._open.arguments += event.fragment
        return [self._event("response.function_call_arguments.delta", item_id=self._open.id,
                            output_index=self._index(), delta=event.fragment)]

    def _text_delta(self, kind: type[OutputMessage] | type[OutputReasoning], text: str,
                    delta_type: str) -> list[ResponseStreamEvent]:
        events: list[ResponseStreamEvent] = []
        if not isinstance(self._open, kind):
            events = self._close()
            if kind is OutputMessage:
                item, part = OutputMessage(id=item_id("msg"), status="in_progress", content=[]), OutputText(text="")
            else:
                item, part = OutputReasoning(id=item_id("rs"), status="in_progress", content=[]), ReasoningText(text="")
            events += self._add(item)
            item.content.append(part)
            if kind is OutputMessage:  # the SDK's stream state adds message parts from this event
                events.append(self._event("response.content_part.added", item_id=item.id, output_index=self._index(),
                                          content_index=0, part=part.model_copy()))
        self._open.content[0].text += text
        extra = {"logprobs": []} if kind is OutputMessage else {}
        return events + [self._event(delta_type, item_id=self._open.id, output_index=self._index(),
                                     content_index=0, delta=text, **extra)]

    def _index(self) -> int:
        return len(self.response.output) - 1

    def _add(self, item: OutputMessage | OutputReasoning | OutputFunctionCall) -> list[ResponseStreamEvent]:
        self.response.output.append(item)
        self._open = item
        return [self._event("response.output_item.added", output_index=self._index(), item=item.model_copy(deep=True))]

    def _close(self, status: str = "completed") -> list[ResponseStreamEvent]:
        item, self._open = self._open, None
        if item is None:
            return []
        item.status = status
        where = {"item_id": item.id, "output_index": self.response.output.index(item)}
        if isinstance(item, OutputFunctionCall):
            events = [self._event("response.function_call_arguments.done", **where, name=item.name,
                                  arguments=item.arguments)]
        elif isinstance(item, OutputMessage):
            part = item.content[0]
            events = [self._event("response.output_text.done", **where, content_index=0, text=part.text, logprobs=[]),
                      self._event("response.content_part.done", **where, content_index=0, part=part.model_copy())]
        else:
            events = [self._event("response.reasoning_text.done", **where, content_index=0, text=item.content[0].text)]
        return events + [self._event("response.output_item.done", output_index=where["output_index"],
                                     item=item.model_copy(deep=True))]

    def finish(self, outcome: Outcome) -> list[ResponseStreamEvent]:
        """Close the last item and end with `response.completed`, or `response.incomplete` when the
        output limit cut the answer."""
        cut = outcome.finish_reason is FinishReason.LENGTH
        events = self._close("incomplete" if cut else "completed")
        if not self.response.output:  # an empty answer is still a message
            events += self._text_delta(OutputMessage, self._space, "response.output_text.delta") + self._close()
        self.response.usage = ResponseUsage(
            input_tokens=outcome.prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=outcome.cached_tokens),
            output_tokens=outcome.completion_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=outcome.reasoning_tokens or 0),
            total_tokens=outcome.prompt_tokens + outcome.completion_tokens)
        if cut:
            self.response.status = "incomplete"
            self.response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            return events + [self._lifecycle("response.incomplete")]
        self.response.status = "completed"
        return events + [self._lifecycle("response.completed")]

    def fail(self, error: APIError) -> list[ResponseStreamEvent]:
        """End a failed generation with `response.failed`, its error in the response."""
        events = self._close("incomplete")
        self.response.status = "failed"
        self.response.error = ResponseError(code=error.code or "server_error", message=error.message)
        return events + [self._lifecycle("response.failed")]


def named_event(event: ResponseStreamEvent) -> bytes:
    """One `event: <type>` / `data: <json>` server-sent event."""
    return b"event: " + event.type.encode("ascii") + b"\n" + sse.event(event)


def response_stream(assembler: ResponseAssembler, generation: Generation, account: Accounting, *,
                    heartbeat_seconds: float) -> Iterator[bytes]:
    """The streamed response: lifecycle, item and delta events, then `response.completed` (or
    `.incomplete`, or `.failed` with the error)."""
    outcome = generation.outcome
    for event in assembler.start():
        yield named_event(event)
    with closing(accounted_events(generation, heartbeat_seconds, account)) as events:
        for event in events:
            if event is QUIET:
                yield sse.PING
                continue
            for produced in assembler.push(event):
                yield named_event(produced)
    if outcome.finish_reason is FinishReason.CANCELLED:  # the client left
        return
    ending = assembler.fail(generation_failure(outcome.error, outcome.error_code)) if outcome.error \
        else assembler.finish(outcome)
    for event in ending:
        yield named_event(event)


def response_answer(assembler: ResponseAssembler, generation: Generation, account: Accounting) -> ResponseObject:
    """The whole response once the generation has ended (a failed one raises its error)."""
    collected = collect_accounted(generation, account)
    replayed: list[Event | ReasoningDelta] = [ReasoningDelta(collected.reasoning)] if collected.reasoning else []
    if collected.content is not None:
        replayed.append(ContentDelta(collected.content))
    for index, call in enumerate(collected.calls):
        replayed += [ToolCallStart(index, call.id, call.name), ToolCallArguments(index, call.arguments)]
    for event in replayed:
        assembler.push(event)
    assembler.finish(generation.outcome)
    return assembler.response


_EVENT_NAMES = list(get_args(StreamEventType))
RESPONSE_EVENT_SCHEMA = {"type": "object", "required": ["event", "data"], "description": RESPONSES_EVENTS,
                         "properties": {"event": {"enum": _EVENT_NAMES}, "data": {
                             "type": "string", "contentMediaType": "application/json", "contentSchema": {
                                 "type": "object", "required": ["type", "sequence_number"], "properties": {
                                     "type": {"enum": _EVENT_NAMES}, "sequence_number": {"type": "integer"}}}}}}


@responses_api.post("/v1/responses")
@documented("createResponse", "generation", "Response (OpenAI Responses API, stateless)", {200: Reply(
    "The response: `application/json` (`response`), or `text/event-stream` when `stream` is true.",
    ResponseObject, media="text/event-stream", media_schema=RESPONSE_EVENT_SCHEMA)},
    body=ResponsesRequest, examples=RESPONSES_EXAMPLES, errors=(429, 503))
def create_response():
    """A response, streamed (SSE with named events) or whole, with function tools and structured output."""
    request = parse_body(ResponsesRequest, raw_request.get_data(cache=False))
    log_unknown_fields(request)
    image_params: dict[str, str] = {}
    with responses_params(image_params):
        run = start_chat(chat_request(request, image_params))
    assembler, account = ResponseAssembler(request, run.model), Accounting()
    if request.stream:
        return event_stream(response_stream(assembler, run.generation, account,
                                            heartbeat_seconds=state_of().settings.heartbeat_seconds))
    return whole_answer(lambda: response_answer(assembler, run.generation, account))
