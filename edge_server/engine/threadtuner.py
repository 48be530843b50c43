"""How many threads the next decode step uses: all it may, or fewer while fewer run faster (pure).

llama.cpp's threads meet at a barrier after every operation of a step. When another process keeps
one of the cores busy, the thread that shares that core arrives late every time and the others wait:
on 2 cores beside one busy process, SmolLM2-135M decoded at 31 tok/s with 2 threads and at 70 with
1. The tuner now and then tries one thread fewer (or, once it has gone down, one more), keeps what
decodes faster, and probes at once when steps become markedly slower or faster than before.
"""

from __future__ import annotations

import statistics
from collections import deque

FIRST_PROBE_AFTER = 64  # decode steps before the first probe, and after every change
LONGEST_PROBE_INTERVAL = 4096  # failed probes double the interval up to this
PROBE_STEPS = 6
WINDOW = 16  # recent steps per (threads, batch size) compared
BETTER = 0.9  # a probe must be at least 10% faster to win
SHIFT = 1.3  # steps this much slower (or faster) than when last probed mean the load changed: probe now


class ThreadTuner:
    """Decides the thread count of each decode step from the durations of the steps before it."""

    def __init__(self, most: int, *, adaptive: bool = True):
        self.most = most
        self.threads = most  # what steps use outside a probe
        self._adaptive = adaptive and most > 1
        self._recent: dict[tuple[int, int], deque[float]] = {}
        self._baseline: dict[int, float] = {}  # batch size -> median step time when last probed
        self._interval = FIRST_PROBE_AFTER
        self._since_probe = 0
        self._probes = 0
        self._probe: int | None = None
        self._probe_left = 0

    def next_step_threads(self) -> int:
        """Threads for the next decode step."""
        return self._probe if self._probe is not None else self.threads

    def record(self, batch_tokens: int, seconds: float) -> None:
        """Count a generation-only step (no prompt chunk) of `batch_tokens` tokens that took `seconds`."""
        if not self._adaptive:
            return
        used = self.next_step_threads()
        recent = self._recent.setdefault((used, batch_tokens), deque(maxlen=WINDOW))
        recent.append(seconds)
        if self._probe is not None:
            self._probe_left -= 1
            if self._probe_left == 0:
                self._end_probe(batch_tokens)
            return
        self._since_probe += 1
        if len(recent) < PROBE_STEPS:
            return
        median = statistics.median(recent)
        baseline = self._baseline.setdefault(batch_tokens, median)
        load_changed = not baseline / SHIFT < median < baseline * SHIFT
        if self._since_probe >= self._interval or load_changed:
            self._baseline[batch_tokens] = median
            self._start_probe(batch_tokens)

    def _start_probe(self, batch_tokens: int) -> None:
        self._probes += 1
        up = self.threads < self.most and (self.threads == 1 or self._probes % 2 == 0)
        candidate = self.threads + 1 if up else self.threads - 1
        self._recent.pop((candidate, batch_tokens), None)  # old figures for it describe another load
        self._probe, self._probe_left, self._since_probe = candidate, PROBE_STEPS, 0

    def _end_probe(self, batch_tokens: int) -> None:
        candidate, self._probe = self._probe, None
        tried = self._recent.get((candidate, batch_tokens))
        current = self._recent.get((self.threads, batch_tokens))
        if tried and current and len(tried) >= PROBE_STEPS // 2 \
                and statistics.median(tried) < BETTER * statistics.median(current):
            self.threads = candidate
            self._baseline.clear()
            self._interval = FIRST_PROBE_AFTER
        else:
            self._interval = min(2 * self._interval, LONGEST_PROBE_INTERVAL)
