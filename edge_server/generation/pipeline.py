"""One request's run: engine tokens -> whole-character text, cut at stop strings, split into content
and tool calls, with usage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from edge_server.engine.protocol import EngineClient
from edge_server.engine.types import ENGINE_STOPPED, Finish, FinishReason, Job, Token, TokenStream
from edge_server.generation.reasoning import ReasoningDelta, ReasoningSplitter
from edge_server.generation.textstream import StopBuffer, Utf8Decoder
from edge_server.dialects.calls import CallExtractor, ContentDelta, Event, ToolCallArguments, ToolCallStart


class Heartbeat:
    """Yielded by `Generation.events` when nothing was produced for a while (keeps the stream alive)."""


QUIET = Heartbeat()  # yielded by `Generation.events` after a quiet spell


class ClientGone(Exception):
    """The HTTP client disconnected; the generation was cancelled."""


@dataclass
class Outcome:
    """How a generation ended and what it cost."""

    finish_reason: FinishReason = FinishReason.STOP
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache spared
    completion_tokens: int = 0
    reasoning_tokens: int | None = None  # None: the output was not split (no thinking template)
    stop_sequence: str | None = None  # the client's stop string that ended the text
    error: str | None = None
    error_code: str | None = None
    first_token_seconds: float | None = None
    draft_tokens: int = 0  # speculative decoding: tokens drafted and verified
    draft_accepted: int = 0  # of those, the ones the model agreed with
    forced_tokens: int = 0  # tokens the grammar left no choice about, decoded with the token before them

    @classmethod
    def combined(cls, outcomes: list[Outcome]) -> Outcome:
        """One request's outcome over its choices: the prompt once (they share it), the tokens generated
        summed, the first failure, and the first choice's finish reason."""
        if len(outcomes) == 1:
            return outcomes[0]
        first = outcomes[0]
        failed = next((o for o in outcomes if o.error), None)
        reasoning = [o.reasoning_tokens for o in outcomes if o.reasoning_tokens is not None]
        starts = [o.first_token_seconds for o in outcomes if o.first_token_seconds is not None]
        return cls(finish_reason=failed.finish_reason if failed else first.finish_reason,
                   prompt_tokens=first.prompt_tokens, cached_tokens=first.cached_tokens,
                   completion_tokens=sum(o.completion_tokens for o in outcomes),
                   reasoning_tokens=sum(reasoning) if reasoning else None,
                   error=failed.error if failed else None, error_code=failed.error_code if failed else None,
                   first_token_seconds=min(starts) if starts else None,
                   draft_tokens=sum(o.draft_tokens for o in outcomes),
                   draft_accepted=sum(o.draft_accepted for o in outcomes),
                   forced_tokens=sum(o.forced_tokens for o in outcomes))


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's text, bytes and log-probability, with the likeliest alternatives."""

    text: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]

    @classmethod
    def of(cls, token: Token) -> TokenLogprob:
        """From an engine token that carries log-probabilities."""
        return cls(_token_text(token.piece), list(token.piece), token.logprob,
                   [(_token_text(piece), list(piece), logprob) for piece, logprob in token.top])


def _token_text(piece: bytes) -> str:
    # OpenAI's convention for a token that is not whole UTF-8 on its own.
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in piece)


@dataclass
class CollectedCall:
    """A whole tool call, for non-streamed answers."""

    id: str
    name: str
    arguments: str = ""


@dataclass
class Collected:
    """A whole answer: its content (None when only calls were made), tool calls and reasoning."""

    content: str | None
    calls: list[CollectedCall] = field(default_factory=list)
    reasoning: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of the content's tokens, when asked


class Generation:
    """Drive one submitted job and turn its tokens into events (content deltas never empty or cumulative)."""

    def __init__(
        self,
        stream: TokenStream,
        *,
        prompt_tokens: int,
        stops: list[str],
        extractor: CallExtractor | None = None,
        reasoning: ReasoningSplitter | None = None,
        call_finish_reason: FinishReason = FinishReason.TOOL_CALLS,
        client_gone: Callable[[], bool] = lambda: False,
        poll_seconds: float = 0.05,
        logprobs: bool = False,
    ):
        self._stream = stream
        self._stops = StopBuffer(stops)
        self._decoder = Utf8Decoder()
        self._extractor = extractor
        self._reasoning = reasoning
        self._call_finish_reason = call_finish_reason
        self._client_gone = client_gone
        self._poll = poll_seconds
        self.outcome = Outcome(prompt_tokens=prompt_tokens, reasoning_tokens=0 if reasoning else None)
        self._pending_logprobs: list[TokenLogprob] = []
        self._wants_logprobs = logprobs  # the job asked the engine for log-probabilities

    @classmethod
    def start(cls, engine: EngineClient, job: Job, **options) -> Generation:
        """Submit `job` and wrap its stream; raises `QueueFull` when too many requests wait."""
        return cls(engine.submit(job), prompt_tokens=len(job.prompt), logprobs=job.sampling.logprobs is not None,
                   **options)

    def events(self, heartbeat_seconds: float | None = None) -> Iterator[Event | ReasoningDelta | Heartbeat]:
        """Reasoning, content and tool-call events as they become final, and `QUIET` after each quiet spell.

        Closing the iterator early (client gone) cancels the job. Raises `ClientGone` when the
        client disconnects while we wait.
        """
        quiet_since = last_check = time.monotonic()
        try:
            while True:
                event = self._stream.next(timeout=self._poll)
                now = time.monotonic()
                # Check even while tokens flow: a non-streamed request writes nothing until the end.
                if now - last_check >= self._poll:
                    last_check = now
                    if self._client_gone():
                        raise ClientGone
                if event is None:
                    if heartbeat_seconds is not None and now - quiet_since >= heartbeat_seconds:
                        quiet_since = now
                        yield QUIET
                    continue
                if isinstance(event, Finish):
                    yield from self._split(self._stops.push(self._decoder.flush()) + self._stops.flush(), final=True)
                    self._finish(event)
                    return
                produced = False
                reasoning_before = self._reasoning is not None and self._reasoning.in_block
                for produced_event in self._split(self._on_token(event), final=self._stops.stopped):
                    produced = True
                    yield produced_event
                if reasoning_before or (self._reasoning is not None and self._reasoning.in_block):
                    self.outcome.reasoning_tokens += 1
                if produced:
                    quiet_since = now
                if self._stops.stopped:
                    self._finish(Finish(FinishReason.STOP))
                    return
        finally:
            # Whatever ended us early (stop string, disconnect, closed generator), the engine must let go.
            self._stream.cancel()
            self.outcome.draft_tokens = self._stream.draft_tokens  # counted however it ended (a client that left too)
            self.outcome.draft_accepted = self._stream.draft_accepted
            self.outcome.forced_tokens = self._stream.forced_tokens

    def cancel(self) -> None:
        """Let the engine drop this job (another choice of the request failed, or its client left)."""
        self._stream.cancel()

    def collect(self) -> Collected:
        """Run to the end and return the whole answer (for non-streamed responses)."""
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[CollectedCall] = []
        logprobs: list[TokenLogprob] = []
        for event in self.events():
            logprobs += self.logprobs_for(event)
            if isinstance(event, ContentDelta):
                content.append(event.text)
            elif isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, ToolCallStart):
                calls.append(CollectedCall(event.id, event.name))
            elif isinstance(event, ToolCallArguments):
                calls[-1].arguments += event.fragment
        text = "".join(content)
        thought = "".join(reasoning) or None
        return Collected(None if calls and not text.strip() else text, calls, thought,
                         logprobs if self._wants_logprobs else None)

    def _split(self, text: str, *, final: bool) -> Iterator[Event | ReasoningDelta]:
        if self._reasoning is not None:
            thought, text = self._reasoning.push(text)
            if final:
                more_thought, more_text = self._reasoning.finish()
                thought, text = thought + more_thought, text + more_text
            if thought:
                yield ReasoningDelta(thought)
        if self._extractor is None:
            if text:
                yield ContentDelta(text)
            return
        yield from self._extractor.push(text)
        if final:
            yield from self._extractor.finish()

    def logprobs_for(self, event: object) -> list[TokenLogprob]:
        """The log-probabilities of the tokens whose text `event` releases: those read since the last
        event, for content; none for reasoning and tool calls (OpenAI reports content tokens only)."""
        pending, self._pending_logprobs = self._pending_logprobs, []
        return pending if isinstance(event, ContentDelta) else []

    def _on_token(self, token: Token) -> str:
        if token.logprob is not None:
            self._pending_logprobs.append(TokenLogprob.of(token))
        if self.outcome.completion_tokens == 0:
            self.outcome.first_token_seconds = time.monotonic() - self._stream.submitted_at
            self.outcome.cached_tokens = self._stream.reused_tokens
        self.outcome.completion_tokens += 1
        return self._stops.push(self._decoder.feed(token.piece))

    def _finish(self, finish: Finish) -> None:
        self.outcome.cached_tokens = self._stream.reused_tokens
        self.outcome.stop_sequence = self._stops.matched
        if finish.reason is FinishReason.ERROR:
            self.outcome.error = finish.error or "generation failed"
            self.outcome.error_code = finish.code
            self.outcome.finish_reason = FinishReason.ERROR
        elif finish.reason is FinishReason.CANCELLED:
            # This reader is still here, so the client did not leave: the engine closed under the job.
            self.outcome.error = "The engine stopped before this generation ended; retry."
            self.outcome.error_code = ENGINE_STOPPED
            self.outcome.finish_reason = FinishReason.ERROR
        elif finish.reason is FinishReason.LENGTH and not self._stops.stopped:
            self.outcome.finish_reason = FinishReason.LENGTH
        elif self._extractor is not None and self._extractor.calls:
            self.outcome.finish_reason = self._call_finish_reason
        else:
            self.outcome.finish_reason = FinishReason.STOP
