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
    ChoiceLogprobs,
    CompletionLogprobs,
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
    return collect_all([generation], account)[0]


def collect_all(generations: list[Generation], account: Accounting) -> list[Collected]:
    """Run every choice to its end (they run together in the engine) and account for the request once;
    a client that left (`ClientGone` goes on up) or a failed choice ends the others too."""
    collected: list[Collected] = []
    try:
        for generation in generations:
            collected.append(generation.collect())
            if generation.outcome.error:
                break
    except ClientGone:
        outcome = Outcome.combined([g.outcome for g in generations])
        outcome.finish_reason = FinishReason.CANCELLED
        account.end(outcome, status=499)
        raise
    finally:
        for generation in generations[len(collected):]:
            generation.cancel()
    outcome = Outcome.combined([g.outcome for g in generations])
    account.end(outcome)
    if outcome.error:
        raise generation_failure(outcome.error, outcome.error_code)
    return collected


# ---- chat ------------------------------------------------------------------------------------

def chat_answer(generations: list[Generation], model: str, account: Accounting, *,
                legacy_functions: bool = False, fingerprint: str | None = None) -> ChatCompletion:
    """The whole `chat.completion` once every choice has ended."""
    choices = []
    for index, (generation, collected) in enumerate(zip(generations, collect_all(generations, account))):
        choices.append(ChatChoice(
            index=index, message=_assistant_message(collected, legacy_functions),
            logprobs=None if collected.logprobs is None else ChoiceLogprobs.of(collected.logprobs),
            finish_reason=generation.outcome.finish_reason))
    return ChatCompletion(id=completion_id(), created=now(), model=model, system_fingerprint=fingerprint,
                          choices=choices, usage=_usage(Outcome.combined([g.outcome for g in generations])))


def _assistant_message(collected: Collected, legacy_functions: bool) -> AssistantMessage:
    calls = [FunctionCall(name=call.name, arguments=call.arguments) for call in collected.calls]
    if legacy_functions:
        return AssistantMessage(content=collected.content, reasoning_content=collected.reasoning,
                                function_call=calls[0] if calls else None)
    tool_calls = [ToolCall(id=call.id, function=function) for call, function in zip(collected.calls, calls)]
    return AssistantMessage(content=collected.content, reasoning_content=collected.reasoning,
                            tool_calls=tool_calls or None)


def chat_stream(
    generations: list[Generation], model: str, account: Accounting, *, include_usage: bool,
    heartbeat_seconds: float, legacy_functions: bool = False, fingerprint: str | None = None,
) -> Iterator[bytes]:
    """SSE events: per choice a role chunk, content and tool-call deltas and its finish chunk (choice after
    choice: each chunk names its `index`), then usage if asked and `[DONE]`."""
    chunk_id, created = completion_id(), now()

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> bytes:
        return sse.event(ChatCompletionChunk(id=chunk_id, created=created, model=model, system_fingerprint=fingerprint,
                                             choices=choices, usage=usage))

    def delta_event(index: int, event: Event) -> bytes:
        entries = generations[index].logprobs_for(event)
        return chunk([ChunkChoice(index=index, delta=_chat_delta(event, legacy_functions),
                                  logprobs=ChoiceLogprobs.of(entries) if entries else None)])

    yield from _stream_choices(
        generations, heartbeat_seconds, account,
        start_event=lambda index: chunk([ChunkChoice(index=index, delta=Delta(role="assistant", content=""))]),
        delta_event=delta_event,
        finish_event=lambda index, reason: chunk([ChunkChoice(index=index, delta=Delta(), finish_reason=reason)]),
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

def text_answer(generations: list[Generation], model: str, account: Accounting, *, echo_prefixes: list[str],
                fingerprint: str | None = None) -> TextCompletion:
    """The whole `text_completion` once every choice has ended (`echo_prefixes`: each choice's echoed prompt)."""
    choices = []
    for index, (generation, collected) in enumerate(zip(generations, collect_all(generations, account))):
        echo = echo_prefixes[index]
        logprobs = None if collected.logprobs is None else CompletionLogprobs.of(collected.logprobs, len(echo))
        choices.append(CompletionChoice(index=index, text=echo + (collected.content or ""), logprobs=logprobs,
                                        finish_reason=generation.outcome.finish_reason))
    return TextCompletion(id=completion_id("cmpl"), created=now(), model=model, system_fingerprint=fingerprint,
                          choices=choices, usage=_usage(Outcome.combined([g.outcome for g in generations])))


def text_stream(
    generations: list[Generation], model: str, account: Accounting, *, include_usage: bool,
    heartbeat_seconds: float, echo_prefixes: list[str], fingerprint: str | None = None,
) -> Iterator[bytes]:
    """SSE events of a legacy completion: per choice its echo, text deltas and finish chunk, then usage if
    asked and `[DONE]`."""
    chunk_id, created = completion_id("cmpl"), now()
    offsets = [len(echo) for echo in echo_prefixes]

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> bytes:
        return sse.event(TextCompletion(id=chunk_id, created=created, model=model, system_fingerprint=fingerprint,
                                        choices=choices, usage=usage))

    def delta_event(index: int, event: Event) -> bytes:
        entries = generations[index].logprobs_for(event)
        logprobs = CompletionLogprobs.of(entries, offsets[index]) if entries else None
        offsets[index] += len(event.text)
        return chunk([CompletionChoice(index=index, text=event.text, logprobs=logprobs)])

    yield from _stream_choices(
        generations, heartbeat_seconds, account,
        start_event=lambda index: chunk([CompletionChoice(index=index, text=echo_prefixes[index])])
        if echo_prefixes[index] else None,
        delta_event=delta_event,
        finish_event=lambda index, reason: chunk([CompletionChoice(index=index, text="", finish_reason=reason)]),
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


def _stream_choices(
    generations: list[Generation],
    heartbeat_seconds: float,
    account: Accounting,
    *,
    start_event: Callable[[int], bytes | None],
    delta_event: Callable[[int, Event], bytes],
    finish_event: Callable[[int, str], bytes],
    usage_event: Callable[[Usage], bytes] | None,
) -> Iterator[bytes]:
    """Stream the choices one after another (they are generated together: the later ones' tokens wait
    in their streams), account for the request once, and end with usage and `[DONE]`, or an error event."""
    outcomes = [g.outcome for g in generations]
    done = 0
    try:
        for index, generation in enumerate(generations):
            if (first := start_event(index)) is not None:
                yield first
            with closing(generation.events(heartbeat_seconds)) as events:
                for event in events:
                    yield sse.PING if event is QUIET else delta_event(index, event)
            done += 1
            if generation.outcome.error:
                break
            yield finish_event(index, generation.outcome.finish_reason)
    except (ClientGone, GeneratorExit) as gone:  # GeneratorExit: the WSGI server closed us mid-write
        outcome = Outcome.combined(outcomes)
        outcome.finish_reason = FinishReason.CANCELLED
        account.end(outcome)
        if isinstance(gone, GeneratorExit):
            raise
        return
    finally:
        for generation in generations[done:]:
            generation.cancel()
    outcome = Outcome.combined(outcomes)
    account.end(outcome)
    if outcome.error:
        yield sse.event(generation_failure(outcome.error, outcome.error_code).body())
        return
    if usage_event is not None:
        yield usage_event(_usage(outcome))
    yield sse.DONE
