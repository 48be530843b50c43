"""Serialise a running `Generation` as OpenAI answers: chat or legacy, streamed (SSE) or whole."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing

from edge_server.api import sse
from edge_server.api.errors import generation_failure
from edge_server.api.observability import Accounting
from edge_server.engine.types import FinishReason
from edge_server.generation.reasoning import ReasoningDelta
from edge_server.generation.pipeline import QUIET, ClientGone, Collected, Generation, Heartbeat, Outcome
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
from edge_server.dialects.calls import ContentDelta, Event, ToolCallArguments, ToolCallStart


def _usage(outcome: Outcome) -> Usage:
    return Usage.of(outcome.prompt_tokens, outcome.completion_tokens, outcome.reasoning_tokens, outcome.cached_tokens)


def collect_accounted(generation: Generation, account: Accounting) -> Collected:
    """Run the generation to its end and account for it once: a 499 when the client left (`ClientGone`
    goes on up), else a 200, then the error of a failed generation is raised."""
    try:
        collected = generation.collect()
    except ClientGone:
        generation.outcome.finish_reason = FinishReason.CANCELLED
        account.end(generation.outcome, status=499)
        raise
    account.end(generation.outcome)
    if generation.outcome.error:
        raise generation_failure(generation.outcome.error, generation.outcome.error_code)
    return collected


# ---- chat ------------------------------------------------------------------------------------

def chat_answer(generation: Generation, model: str, account: Accounting, *,
                legacy_functions: bool = False, fingerprint: str | None = None) -> ChatCompletion:
    """The whole `chat.completion` once the generation has ended."""
    collected = collect_accounted(generation, account)
    outcome = generation.outcome
    return ChatCompletion(
        id=completion_id(),
        created=now(),
        model=model,
        system_fingerprint=fingerprint,
        choices=[ChatChoice(message=_assistant_message(collected, legacy_functions),
                            finish_reason=outcome.finish_reason)],
        usage=_usage(outcome),
    )


def _assistant_message(collected: Collected, legacy_functions: bool) -> AssistantMessage:
    calls = [FunctionCall(name=call.name, arguments=call.arguments) for call in collected.calls]
    if legacy_functions:
        return AssistantMessage(content=collected.content, reasoning_content=collected.reasoning,
                                function_call=calls[0] if calls else None)
    tool_calls = [ToolCall(id=call.id, function=function) for call, function in zip(collected.calls, calls)]
    return AssistantMessage(content=collected.content, reasoning_content=collected.reasoning,
                            tool_calls=tool_calls or None)


def chat_stream(
    generation: Generation, model: str, account: Accounting, *, include_usage: bool, heartbeat_seconds: float,
    legacy_functions: bool = False, fingerprint: str | None = None,
) -> Iterator[bytes]:
    """SSE events: role chunk, content and tool-call deltas, the finish chunk, usage if asked, `[DONE]`."""
    chunk_id, created = completion_id(), now()

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        return sse.event(ChatCompletionChunk(id=chunk_id, created=created, model=model, system_fingerprint=fingerprint,
                                             choices=choices, usage=usage))

    def delta_event(event: Event) -> bytes:
        return chunk([ChunkChoice(delta=_chat_delta(event, legacy_functions))])

    yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
    yield from _stream_body(
        generation,
        heartbeat_seconds,
        account,
        delta_event=delta_event,
        finish_event=lambda reason: chunk([ChunkChoice(delta=Delta(), finish_reason=reason)]),
        usage_event=(lambda usage: chunk([], usage)) if include_usage else None,
    )


def _chat_delta(event: Event | ReasoningDelta, legacy_functions: bool) -> Delta:
    if isinstance(event, ContentDelta):
        return Delta(content=event.text)
    if isinstance(event, ReasoningDelta):
        return Delta(reasoning_content=event.text)
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

def text_answer(generation: Generation, model: str, account: Accounting, *, echo_prefix: str = "",
                fingerprint: str | None = None) -> TextCompletion:
    """The whole `text_completion` once the generation has ended."""
    text = collect_accounted(generation, account).content or ""
    outcome = generation.outcome
    return TextCompletion(
        id=completion_id("cmpl"),
        created=now(),
        model=model,
        system_fingerprint=fingerprint,
        choices=[CompletionChoice(text=echo_prefix + text, finish_reason=outcome.finish_reason)],
        usage=_usage(outcome),
    )


def text_stream(
    generation: Generation, model: str, account: Accounting, *, include_usage: bool, heartbeat_seconds: float,
    echo_prefix: str = "", fingerprint: str | None = None,
) -> Iterator[bytes]:
    """SSE events of a legacy completion: text deltas, the finish chunk, usage if asked, `[DONE]`."""
    chunk_id, created = completion_id("cmpl"), now()

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse.event(TextCompletion(id=chunk_id, created=created, model=model, system_fingerprint=fingerprint,
                                        choices=choices, usage=usage))

    if echo_prefix:
        yield chunk([CompletionChoice(text=echo_prefix)])
    yield from _stream_body(
        generation,
        heartbeat_seconds,
        account,
        delta_event=lambda event: chunk([CompletionChoice(text=event.text)]),
        finish_event=lambda reason: chunk([CompletionChoice(text="", finish_reason=reason)]),
        usage_event=(lambda usage: chunk([], usage)) if include_usage else None,
    )


def accounted_events(generation: Generation, heartbeat_seconds: float,
                     account: Accounting) -> Iterator[Event | ReasoningDelta | Heartbeat]:
    """A stream's events (`QUIET` in quiet spells), its request accounted once however it ends: a client that
    left ends the iteration with the outcome CANCELLED; closing this (the WSGI server did) closes the generation."""
    outcome = generation.outcome
    try:
        with closing(generation.events(heartbeat_seconds)) as events:
            yield from events
    except (ClientGone, GeneratorExit) as gone:  # GeneratorExit: the WSGI server closed us mid-write
        outcome.finish_reason = FinishReason.CANCELLED
        account.end(outcome)
        if isinstance(gone, GeneratorExit):
            raise
        return
    account.end(outcome)  # before the last events: the line is logged by the time the client has them


def _stream_body(
    generation: Generation,
    heartbeat_seconds: float,
    account: Accounting,
    *,
    delta_event: Callable[[Event], bytes],
    finish_event: Callable[[str], bytes],
    usage_event: Callable[[Usage], bytes] | None,
) -> Iterator[bytes]:
    outcome = generation.outcome
    with closing(accounted_events(generation, heartbeat_seconds, account)) as events:
        for event in events:
            yield sse.PING if event is QUIET else delta_event(event)
    if outcome.finish_reason is FinishReason.CANCELLED:
        return
    if outcome.error:
        yield sse.event(generation_failure(outcome.error, outcome.error_code).body())
        return
    yield finish_event(outcome.finish_reason)
    if usage_event is not None:
        yield usage_event(_usage(outcome))
    yield sse.DONE
