"""What every tool-call dialect shares: the events, and the extractor around `<tool_call>` blocks (pure).

A dialect supplies only the reading of one block (`CallBlock`); `CallExtractor` keeps content apart
from the blocks, holds a possible opening tag back, applies `max_calls` and decides what becomes of
a malformed or cut-off block, the same way for every dialect.
"""

from __future__ import annotations

import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from edge_server.generation.textstream import StopBuffer

log = logging.getLogger("edge_server.toolcalls")

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"

Functions = Mapping[str, "dict[str, Any] | None"]  # callable function name -> its parameters schema


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for `delta.content`."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call's first delta: its index, id and function name (arguments follow)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArguments:
    """A fragment of a call's JSON arguments."""

    index: int
    fragment: str


Event = ContentDelta | ToolCallStart | ToolCallArguments


def new_call_id() -> str:
    """An OpenAI-style tool call id."""
    return f"call_{uuid.uuid4().hex[:24]}"


class CallBlock(ABC):
    """The text after one opening tag, turned into a call's events as soon as each part is certain.

    `push` sets `closed` once the block's closing tag has been read, with the text after it in `rest`;
    `raw` is the block's own text (without the tags), returned as content when the block is malformed.
    """

    def __init__(self, index: int, functions: Functions):
        self.index = index
        self.id = new_call_id()
        self.functions = functions
        self.name: str | None = None
        self.raw = ""
        self.closed = False
        self.rest = ""

    @property
    def started(self) -> bool:
        """Whether the call's first delta has been produced."""
        return self.name is not None

    @abstractmethod
    def push(self, text: str) -> list[Event]:
        """Read the next text of the block; return the events it completes."""

    def flush(self) -> list[Event]:
        """The stream ended inside the block: events for text held back until now."""
        return []

    @abstractmethod
    def finish(self) -> tuple[list[Event], bool]:
        """Events still owed once the block has ended, and whether it was a valid call."""


class ClosingTagBlock(CallBlock):
    """A block that ends at the first `</tool_call>`; subclasses read its inner text with `feed`."""

    def __init__(self, index: int, functions: Functions):
        super().__init__(index, functions)
        self._end = StopBuffer([CLOSE_TAG])

    def push(self, text: str) -> list[Event]:
        inner = self._end.push(text)
        events = self.feed(inner) if inner else []
        if self._end.stopped:
            self.closed, self.rest = True, self._end.after_stop
        return events

    def flush(self) -> list[Event]:
        tail = self._end.flush()
        return self.feed(tail) if tail else []

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """Read the next inner text (never a part of the closing tag)."""


class CallExtractor:
    """Split streamed model text into content and tool calls; a partial tag never reaches content.

    With `incremental` (streaming), a call's deltas go out as soon as they are certain; otherwise a
    block is held until it ends and becomes content if malformed (unknown function, broken markup).
    `functions` maps each callable name to its parameters schema (a collection of names also does).
    """

    def __init__(self, functions: Functions | Collection[str], block: Callable[[int, Functions], CallBlock], *,
                 max_calls: int | None = None, incremental: bool = True):
        self._functions = dict(functions) if isinstance(functions, Mapping) else dict.fromkeys(functions)
        self._new_block = block
        self._max_calls = max_calls
        self._incremental = incremental
        self._text = StopBuffer([OPEN_TAG])
        self._block: CallBlock | None = None
        self._held: list[Event] = []
        self._blank = ""  # trailing white space of the content, sent once real content follows
        self._layout = ""  # the white space before the current block
        self.calls = 0

    def push(self, text: str) -> list[Event]:
        """Feed the next text; return the events it completes."""
        events: list[Event] = []
        while text:
            text = self._push_block(text, events) if self._block is not None else self._push_text(text, events)
        return events

    def finish(self) -> list[Event]:
        """Flush at the end of the stream (an unclosed block counts as ended there)."""
        events: list[Event] = []
        if self._block is None:
            self._content(self._text.flush(), events)
            if self._blank and not self.calls:
                events.append(ContentDelta(self._blank))
            self._blank = ""
            return events
        events.extend(self._take(self._block.flush()))
        self._end_block(events, closed=False)
        return events

    def _push_text(self, text: str, events: list[Event]) -> str:
        self._content(self._text.push(text), events)
        if not self._text.stopped:
            return ""
        rest, self._text = self._text.after_stop, StopBuffer([OPEN_TAG])
        self._layout, self._blank = self._blank, ""  # white space before a call is layout, unless no call comes
        self._block = self._new_block(self.calls, self._functions)
        return rest

    def _content(self, text: str, events: list[Event]) -> None:
        # Trailing white space waits for what follows: before a call it is layout and is dropped.
        body = text.rstrip()
        if not body:
            self._blank += text
            return
        events.append(ContentDelta(self._blank + body))
        self._blank = text[len(body) :]

    def _push_block(self, text: str, events: list[Event]) -> str:
        events.extend(self._take(self._block.push(text)))
        if not self._block.closed:
            return ""
        rest = self._block.rest
        self._end_block(events, closed=True)
        return rest

    def _take(self, produced: list[Event]) -> list[Event]:
        if self._incremental and not self._over_limit():
            return produced
        self._held.extend(produced)
        return []

    def _end_block(self, events: list[Event], *, closed: bool) -> None:
        block, self._block = self._block, None
        owed, valid = block.finish()
        if self._over_limit():
            log.warning("dropping tool call %r: parallel_tool_calls is false and a call was already made", block.name)
        elif valid:
            events.extend(self._held if not self._incremental else [])
            events.extend(owed)
            self.calls += 1
        elif not closed:
            # Cut off (max_tokens) inside a block: partial markup never becomes content. A call whose
            # name is known stays a call with the arguments written so far, as OpenAI's cut-off calls do.
            if block.started:
                log.warning("tool call %r was cut off; its arguments are incomplete", block.name)
                events.extend(self._held if not self._incremental else [])
                self.calls += 1
            else:
                log.warning("unfinished tool call block dropped: %r", block.raw[:200])
        elif block.started and self._incremental:
            log.warning("tool call %r was streamed but its block is malformed: %r", block.name, block.raw[:200])
            self.calls += 1
        else:
            log.warning("malformed tool call block returned as content: %r", block.raw[:200])
            events.append(ContentDelta(self._layout + OPEN_TAG + block.raw + (CLOSE_TAG if closed else "")))
        self._held = []

    def _over_limit(self) -> bool:
        return self._max_calls is not None and self.calls >= self._max_calls
