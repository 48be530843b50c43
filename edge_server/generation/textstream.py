"""Token bytes -> text: incremental UTF-8 decoding and the stop-word tail buffer (pure, no I/O)."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class Utf8Decoder:
    """Decode a byte stream split anywhere (even inside a character) into whole characters."""

    def __init__(self) -> None:
        # "replace" keeps every byte accounted for: invalid bytes become U+FFFD instead of vanishing.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Return the characters completed by `data`; an unfinished character is kept for later."""
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Return what is left at the end of the stream (an unfinished character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


def earliest_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop string in `text`, or -1."""
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return min(found) if found else -1


class StopBuffer:
    """Release text as soon as it cannot be the start of a stop string; cut at the earliest stop."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self.after_stop = ""  # the text that followed the stop string in the last push (dropped, but kept here)

    def push(self, text: str) -> str:
        """Add `text`; return what can be released now. After a stop, everything is dropped."""
        if self.stopped or not text:
            return ""
        if not self._stops:
            return text
        pending = self._held + text
        cut = earliest_stop(pending, self._stops)
        partial = len(pending) - self._longest_stop_prefix_suffix(pending)
        # A stop string that starts before `cut` may still complete; only then is `cut` not final.
        if cut >= 0 and partial >= cut:
            return self._stop_at(pending, cut)
        release = min(partial, cut) if cut >= 0 else partial
        self._held = pending[release:]
        return pending[:release]

    def flush(self) -> str:
        """Release the held tail at the end of the stream, cut at a stop string it completed."""
        held, self._held = self._held, ""
        if self.stopped:
            return ""
        cut = earliest_stop(held, self._stops)
        return self._stop_at(held, cut) if cut >= 0 else held

    def _stop_at(self, text: str, cut: int) -> str:
        self.stopped = True
        self._held = ""
        self.matched = max((stop for stop in self._stops if text.startswith(stop, cut)), key=len)
        self.after_stop = text[cut + len(self.matched) :]
        return text[:cut]

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
