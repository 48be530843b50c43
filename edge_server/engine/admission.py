"""Admission: the wait queue in front of the engine's slots, `--max-queue`, drain and close (no llama.cpp).

The HTTP threads submit jobs here; the engine's worker takes them out when a slot is free. Draining
and closing are flags the worker reads between steps, so a job is never ended while it decodes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from edge_server.engine.types import SHUTTING_DOWN, Finish, FinishReason, Job, QueueFull, RequestTooLarge, TokenStream

Waiting = tuple[Job, TokenStream]


class Admission:
    """Jobs waiting for one of `parallel` slots; `running()` tells how many slots hold a job now."""

    def __init__(self, *, n_ctx: int, parallel: int, max_queue: int, running: Callable[[], int]):
        self._n_ctx = n_ctx
        self._parallel = parallel
        self._max_queue = max_queue
        self._running = running
        self._pending: queue.Queue[Waiting | None] = queue.Queue()  # None only wakes the worker
        self._lock = threading.Lock()
        self.closing = False
        self.draining = False  # shutting down: no new jobs start
        self.abort_reason: str | None = None  # set: running jobs end with this error at the next step

    # ---- the HTTP threads' side --------------------------------------------------------------

    @property
    def largest_group(self) -> int:
        """The most jobs one request may submit together: every slot and the whole queue."""
        return self._parallel + self._max_queue

    def submit(self, job: Job) -> TokenStream:
        """Queue a job; returns its stream at once. Raises `QueueFull` when `--max-queue` are waiting, and
        `RequestTooLarge` when the job's group could never be held at once (a 429 would be retried forever)."""
        if not job.prompt or job.max_tokens < 1 or len(job.prompt) + job.max_tokens > self._n_ctx:
            raise ValueError("job does not fit the context")
        if job.group > self.largest_group:
            raise RequestTooLarge(self.largest_group)
        stream = TokenStream()
        with self._lock:
            if self.closing or self.draining or self._waiting() >= self._max_queue + (self._parallel - self._running()):
                raise QueueFull
            self._pending.put((job, stream))
        return stream

    def _waiting(self) -> int:
        # Jobs whose clients already left still sit in the queue until the worker drops them;
        # they must not make a live request wait or be refused.
        with self._pending.mutex:
            return sum(1 for item in self._pending.queue if item is not None and not item[1].cancelled)

    @property
    def queued(self) -> int:
        """Jobs waiting for a free slot."""
        return self._pending.qsize()

    def drain(self, grace_seconds: float, reason: str) -> None:
        """Start no more jobs (waiting ones end with an error), let running ones finish for up to
        `grace_seconds`, then have the worker end those with `reason`. Blocks until no job runs."""
        self.draining = True
        self._pending.put(None)  # wakes an idle worker so that it sees the drain
        deadline = time.monotonic() + grace_seconds
        while self._running() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.abort_reason = reason
        while self._running() or self.queued:
            time.sleep(0.02)

    def close(self) -> None:
        """Refuse new jobs and wake the worker so that it stops (it ends what runs and waits)."""
        self.closing = True
        self._pending.put(None)

    # ---- the worker thread -------------------------------------------------------------------

    def next(self, *, block: bool) -> Waiting | None:
        """The oldest live waiting job, or None when none waits (`block`: until one comes or a wake-up).

        Jobs whose clients left while waiting end here as cancelled.
        """
        while True:
            try:
                item = self._pending.get() if block else self._pending.get_nowait()
            except queue.Empty:
                return None
            if item is None:  # close() or drain() waking the worker
                return None
            if not item[1].cancelled:
                return item
            item[1]._emit(Finish(FinishReason.CANCELLED))

    def end_waiting(self, finish: Finish) -> None:
        """End every job still in the queue with `finish`."""
        while True:
            try:
                item = self._pending.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item[1]._emit(finish)

    def refuse_waiting(self) -> None:
        """While draining: end every waiting job with the shutdown error."""
        self.end_waiting(Finish(FinishReason.ERROR, "the server is shutting down", SHUTTING_DOWN))
