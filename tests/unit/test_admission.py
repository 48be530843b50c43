"""The engine's wait queue without a model: `--max-queue`, clients that leave while waiting, drain and close."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from edge_server.engine.admission import Admission
from edge_server.engine.types import (SHUTTING_DOWN, Finish, FinishReason, Job, QueueFull, RequestTooLarge, Sampling,
                                      TokenStream)

JOB = Job(prompt=[1, 2, 3], max_tokens=4, sampling=Sampling())


class Slots:
    """How many slots hold a job, as the engine would report it."""

    def __init__(self, running: int = 0):
        self.running = running

    def __call__(self) -> int:
        return self.running


def admission(*, parallel: int = 1, max_queue: int = 1, running: int = 0) -> tuple[Admission, Slots]:
    slots = Slots(running)
    return Admission(n_ctx=16, parallel=parallel, max_queue=max_queue, running=slots), slots


def finish_of(stream: TokenStream) -> Finish | None:
    return stream.next(timeout=0)


@pytest.mark.parametrize("job", [
    Job(prompt=[], max_tokens=4, sampling=Sampling()),
    Job(prompt=[1], max_tokens=0, sampling=Sampling()),
    Job(prompt=[1] * 10, max_tokens=7, sampling=Sampling()),
])
def test_a_job_that_does_not_fit_the_context_is_a_programming_error(job):
    queue, _ = admission()
    with pytest.raises(ValueError):
        queue.submit(job)


def test_a_group_larger_than_slots_and_queue_together_is_refused_as_too_large_not_as_busy():
    queue, _ = admission(parallel=2, max_queue=3)
    with pytest.raises(RequestTooLarge) as refused:
        queue.submit(dataclasses.replace(JOB, group=6))
    assert refused.value.limit == 5 and queue.queued == 0
    streams = [queue.submit(dataclasses.replace(JOB, group=5)) for _ in range(5)]  # the largest is held whole
    assert len(streams) == 5 and queue.queued == 5


def test_the_queue_holds_max_queue_jobs_beyond_the_free_slots():
    queue, slots = admission(parallel=2, max_queue=1)
    streams = [queue.submit(JOB) for _ in range(3)]  # two for the free slots, one waiting
    with pytest.raises(QueueFull):
        queue.submit(JOB)
    assert queue.queued == 3
    slots.running = 1  # one slot busy: only two may wait now
    assert queue.next(block=False) == (JOB, streams[0])
    with pytest.raises(QueueFull):
        queue.submit(JOB)


def test_clients_that_left_do_not_hold_places_and_end_as_cancelled_when_taken():
    queue, _ = admission(parallel=1, max_queue=0)
    left = queue.submit(JOB)
    left.cancel()
    live = queue.submit(JOB)  # the cancelled job does not count against the queue
    with pytest.raises(QueueFull):
        queue.submit(JOB)
    assert queue.next(block=False) == (JOB, live)
    assert finish_of(left) == Finish(FinishReason.CANCELLED)
    assert queue.next(block=False) is None


def test_close_refuses_new_jobs_wakes_the_worker_and_waiting_jobs_end_as_cancelled():
    queue, _ = admission(parallel=1, max_queue=4)
    waiting = [queue.submit(JOB) for _ in range(3)]
    queue.close()
    assert queue.closing
    with pytest.raises(QueueFull):
        queue.submit(JOB)
    queue.end_waiting(Finish(FinishReason.CANCELLED))  # what the worker does once it has stopped
    assert [finish_of(stream) for stream in waiting] == [Finish(FinishReason.CANCELLED)] * 3
    assert queue.queued == 0


def test_a_blocked_worker_is_woken_by_close():
    queue, _ = admission()
    taken: list[object] = []
    worker = threading.Thread(target=lambda: taken.append(queue.next(block=True)))
    worker.start()
    queue.close()
    worker.join(timeout=5)
    assert not worker.is_alive() and taken == [None]


def test_drain_refuses_waiting_jobs_then_ends_running_ones_after_the_grace_period():
    queue, slots = admission(parallel=1, max_queue=4, running=1)
    waiting = [queue.submit(JOB) for _ in range(2)]
    stop = threading.Event()

    def worker() -> None:  # the engine's loop, reduced to what drain relies on
        while not stop.is_set():
            if queue.draining:
                queue.refuse_waiting()
            if queue.abort_reason is not None:
                slots.running = 0  # the next step ends the running job with the reason
            stop.wait(0.01)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        queue.drain(0.1, "bye")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert queue.abort_reason == "bye" and slots.running == 0 and queue.queued == 0
    refused = Finish(FinishReason.ERROR, "the server is shutting down", SHUTTING_DOWN)
    assert [finish_of(stream) for stream in waiting] == [refused] * 2
    with pytest.raises(QueueFull):
        queue.submit(JOB)
