"""One request's run: engine tokens -> whole-character text deltas, cut at stop strings, with usage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .engine import Engine, Finish, Job, QueueFull, Token, TokenStream
from .errors import APIError
from .textstream import StopBuffer, Utf8Decoder


class Heartbeat:
    """Yielded by `Generation.deltas` when nothing was produced for a while (keeps the stream alive)."""


HEARTBEAT = Heartbeat()


class ClientGone(Exception):
    """The HTTP client disconnected; the generation was cancelled."""


@dataclass
class Outcome:
    """How a generation ended and what it cost."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    first_token_seconds: float | None = None


class Generation:
    """Drive one submitted job and turn its tokens into text deltas (never empty, never cumulative)."""

    def __init__(
        self,
        stream: TokenStream,
        *,
        prompt_tokens: int,
        stops: list[str],
        client_gone: Callable[[], bool] = lambda: False,
        poll_seconds: float = 0.05,
    ):
        self._stream = stream
        self._stops = StopBuffer(stops)
        self._decoder = Utf8Decoder()
        self._client_gone = client_gone
        self._poll = poll_seconds
        self.outcome = Outcome(prompt_tokens=prompt_tokens)

    @classmethod
    def start(cls, engine: Engine, job: Job, *, stops: list[str], client_gone: Callable[[], bool]) -> Generation:
        """Submit `job` and wrap its stream; a full queue becomes a 429."""
        try:
            stream = engine.submit(job)
        except QueueFull:
            raise APIError(
                "The server is busy: too many requests are waiting. Retry shortly.",
                status=429,
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        return cls(stream, prompt_tokens=len(job.prompt), stops=stops, client_gone=client_gone)

    def deltas(self, heartbeat_seconds: float | None = None) -> Iterator[str | Heartbeat]:
        """Text deltas as they become final, and `HEARTBEAT` after each quiet `heartbeat_seconds`.

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
                        yield HEARTBEAT
                    continue
                if isinstance(event, Finish):
                    tail = self._stops.push(self._decoder.flush()) + self._stops.flush()
                    if tail:
                        yield tail
                    self._finish(event)
                    return
                text = self._on_token(event)
                if text:
                    quiet_since = now
                    yield text
                if self._stops.stopped:
                    self.outcome.finish_reason = "stop"
                    return
        finally:
            # Whatever ended us early (stop string, disconnect, closed generator), the engine must let go.
            self._stream.cancel()

    def text(self) -> str:
        """Run to the end and return the whole text (for non-streamed answers)."""
        return "".join(delta for delta in self.deltas() if isinstance(delta, str))

    def _on_token(self, token: Token) -> str:
        if self.outcome.completion_tokens == 0:
            self.outcome.first_token_seconds = time.monotonic() - self._stream.submitted_at
        self.outcome.completion_tokens += 1
        return self._stops.push(self._decoder.feed(token.piece))

    def _finish(self, finish: Finish) -> None:
        if finish.reason == "error":
            self.outcome.error = finish.error or "generation failed"
        stopped_by_string = self._stops.stopped
        self.outcome.finish_reason = "length" if finish.reason == "length" and not stopped_by_string else "stop"
