"""Serialise a running `Generation` as OpenAI answers: chat or legacy, streamed (SSE) or whole."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import closing

from edge_server.api import sse
from edge_server.api.errors import generation_failure
from edge_server.engine.types import FinishReason
from edge_server.generation.pipeline import QUIET, ClientGone, Collected, Generation, Outcome
from edge_server.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    CompletionChoice,
    Delta,
    FunctionCall,
    FunctionDelta,
    TextCompletion,
    ToolCall,
    ToolCallDelta,
    Usage,
    completion_id,
    now,
)
from edge_server.dialects.hermes import ContentDelta, Event, ToolCallArguments, ToolCallStart

access_log = logging.getLogger("edge_server.access")


def _usage(outcome: Outcome) -> Usage:
    return Usage.of(outcome.prompt_tokens, outcome.completion_tokens)


def _raise_if_failed(outcome: Outcome) -> None:
    if outcome.error:
        raise generation_failure(outcome.error, outcome.error_code)


def log_outcome(request_id: str, route: str, status: int, outcome: Outcome, seconds: float) -> float:
    """Write the access-log line of one generation request; returns its decode rate (tokens/s)."""
    decode_seconds = seconds - (outcome.first_token_seconds or 0.0)
    rate = (outcome.completion_tokens - 1) / decode_seconds if outcome.completion_tokens > 1 and decode_seconds > 0 else 0.0
    ttft = f"{outcome.first_token_seconds * 1000:.0f}ms" if outcome.first_token_seconds is not None else "-"
    access_log.info(
        "%s POST %s %s prompt=%d completion=%d ttft=%s rate=%.1ftok/s finish=%s cached=%d%s",
        request_id, route, status, outcome.prompt_tokens, outcome.completion_tokens, ttft, rate,
        outcome.finish_reason, outcome.cached_tokens, f" error={outcome.error!r}" if outcome.error else "",
    )
    return rate


# ---- chat ------------------------------------------------------------------------------------

def chat_answer(generation: Generation, model: str, *, legacy_functions: bool = False) -> ChatCompletion:
    """The whole `chat.completion` once the generation has ended."""
    collected = generation.collect()
    outcome = generation.outcome
    _raise_if_failed(outcome)
    return ChatCompletion(
        id=completion_id(),
        created=now(),
        model=model,
        choices=[ChatChoice(message=_assistant_message(collected, legacy_functions),
                            finish_reason=outcome.finish_reason)],
        usage=_usage(outcome),
    )


def _assistant_message(collected: Collected, legacy_functions: bool) -> AssistantMessage:
    calls = [FunctionCall(name=call.name, arguments=call.arguments) for call in collected.calls]
    if legacy_functions:
        return AssistantMessage(content=collected.content, function_call=calls[0] if calls else None)
    tool_calls = [ToolCall(id=call.id, function=function) for call, function in zip(collected.calls, calls)]
    return AssistantMessage(content=collected.content, tool_calls=tool_calls or None)


def chat_stream(
    generation: Generation, model: str, *, include_usage: bool, heartbeat_seconds: float,
    legacy_functions: bool = False, on_end: Callable[[Outcome], None] = lambda outcome: None,
) -> Iterator[bytes]:
    """SSE events: role chunk, content and tool-call deltas, the finish chunk, usage if asked, `[DONE]`."""
    chunk_id, created = completion_id(), now()

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        return sse.event(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=choices, usage=usage))

    def delta_event(event: Event) -> bytes:
        return chunk([ChunkChoice(delta=_chat_delta(event, legacy_functions))])

    yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
    yield from _stream_body(
        generation,
        heartbeat_seconds,
        delta_event=delta_event,
        finish_event=lambda reason: chunk([ChunkChoice(delta=Delta(), finish_reason=reason)]),
        usage_event=(lambda usage: chunk([], usage)) if include_usage else None,
        on_end=on_end,
    )


def _chat_delta(event: Event, legacy_functions: bool) -> Delta:
    if isinstance(event, ContentDelta):
        return Delta(content=event.text)
    if isinstance(event, ToolCallStart):
        function = FunctionDelta(name=event.name, arguments="")
        if legacy_functions:
            return Delta(function_call=function)
        return Delta(tool_calls=[ToolCallDelta(index=event.index, id=event.id, type="function", function=function)])
    assert isinstance(event, ToolCallArguments)
    function = FunctionDelta(arguments=event.fragment)
    if legacy_functions:
        return Delta(function_call=function)
    return Delta(tool_calls=[ToolCallDelta(index=event.index, function=function)])


# ---- legacy completions ----------------------------------------------------------------------

def text_answer(generation: Generation, model: str, *, echo_prefix: str = "") -> TextCompletion:
    """The whole `text_completion` once the generation has ended."""
    text = generation.collect().content or ""
    outcome = generation.outcome
    _raise_if_failed(outcome)
    return TextCompletion(
        id=completion_id("cmpl"),
        created=now(),
        model=model,
        choices=[CompletionChoice(text=echo_prefix + text, finish_reason=outcome.finish_reason)],
        usage=_usage(outcome),
    )


def text_stream(
    generation: Generation, model: str, *, include_usage: bool, heartbeat_seconds: float, echo_prefix: str = "",
    on_end: Callable[[Outcome], None] = lambda outcome: None,
) -> Iterator[bytes]:
    """SSE events of a legacy completion: text deltas, the finish chunk, usage if asked, `[DONE]`."""
    chunk_id, created = completion_id("cmpl"), now()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse.event(TextCompletion(id=chunk_id, created=created, model=model, choices=choices, usage=usage))

    if echo_prefix:
        yield chunk([CompletionChoice(text=echo_prefix)])
    yield from _stream_body(
        generation,
        heartbeat_seconds,
        delta_event=lambda event: chunk([CompletionChoice(text=event.text)]),
        finish_event=lambda reason: chunk([CompletionChoice(text="", finish_reason=reason)]),
        usage_event=(lambda usage: chunk([], usage)) if include_usage else None,
        on_end=on_end,
    )


def _stream_body(
    generation: Generation,
    heartbeat_seconds: float,
    *,
    delta_event: Callable[[Event], bytes],
    finish_event: Callable[[str], bytes],
    usage_event: Callable[[Usage], bytes] | None,
    on_end: Callable[[Outcome], None],
) -> Iterator[bytes]:
    outcome = generation.outcome
    try:
        with closing(generation.events(heartbeat_seconds)) as events:
            for event in events:
                yield sse.PING if event is QUIET else delta_event(event)
    except ClientGone:
        outcome.finish_reason = FinishReason.CANCELLED
        on_end(outcome)
        return
    except GeneratorExit:  # the WSGI server closed us: the client went away mid-write
        outcome.finish_reason = FinishReason.CANCELLED
        on_end(outcome)
        raise
    if outcome.error:
        on_end(outcome)
        yield sse.event(generation_failure(outcome.error, outcome.error_code).body())
        return
    yield finish_event(outcome.finish_reason)
    if usage_event is not None:
        yield usage_event(_usage(outcome))
    yield sse.DONE
    on_end(outcome)
