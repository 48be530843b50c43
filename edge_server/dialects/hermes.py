"""Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks -> OpenAI tool-call events (pure)."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from edge_server.generation.textstream import StopBuffer

log = logging.getLogger("edge_server.toolcalls")

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_KEY = re.compile(r'\s*,\s*"arguments"\s*:\s*(?=\{)')
_NAME_PREFIX = '{"name":"'
_ARGUMENTS_PREFIX = ',"arguments":{'


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


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _may_become(text: str, prefix: str) -> bool:
    compact = _compact(text)
    return prefix.startswith(compact) or compact.startswith(prefix)


class _JsonValueEnd:
    """Tracks where one JSON object or array ends, in text that arrives in pieces."""

    def __init__(self) -> None:
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.done = False

    def feed(self, text: str) -> int:
        """How many leading characters of `text` still belong to the value."""
        for i, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class _CallBlock:
    """The text between one pair of tags, turned into events as soon as each part is certain."""

    def __init__(self, index: int, functions: Collection[str]):
        self.index = index
        self.id = new_call_id()
        self._functions = functions
        self.raw = ""
        self.name: str | None = None
        self._after_name = 0
        self._args_start: int | None = None
        self._args_end = _JsonValueEnd()
        self._emitted = 0  # end of the argument text already sent
        self._incremental = True  # False once the block departs from the usual key order

    @property
    def started(self) -> bool:
        """Whether the call's first delta has been produced."""
        return self.name is not None

    def feed(self, text: str) -> list[Event]:
        self.raw += text
        events: list[Event] = []
        if not self._incremental:
            return events
        if self.name is None and not self._read_name(events):
            return events
        if self._args_start is None:
            match = _ARGUMENTS_KEY.match(self.raw, self._after_name)
            if match is None:
                self._incremental = _may_become(self.raw[self._after_name :], _ARGUMENTS_PREFIX)
                return events
            self._args_start = self._emitted = match.end()
        if not self._args_end.done:
            taken = self._args_end.feed(self.raw[self._emitted :])
            if taken:
                events.append(ToolCallArguments(self.index, self.raw[self._emitted : self._emitted + taken]))
                self._emitted += taken
        return events

    def _read_name(self, events: list[Event]) -> bool:
        match = _NAME.match(self.raw)
        if match is None:
            self._incremental = _may_become(self.raw, _NAME_PREFIX)
            return False
        name = json.loads(f'"{match.group(1)}"')
        if name not in self._functions:
            self._incremental = False
            return False
        self.name, self._after_name = name, match.end()
        events.append(ToolCallStart(self.index, self.id, name))
        return True

    def finish(self) -> tuple[list[Event], bool]:
        """Events still owed once the block has ended, and whether it was a valid call."""
        try:
            parsed = json.loads(self.raw)
        except json.JSONDecodeError:
            parsed = None
        valid = (
            isinstance(parsed, dict)
            and parsed.get("name") in self._functions
            and isinstance(parsed.get("arguments", {}), dict | str)
        )
        if not valid:
            return [], False
        events: list[Event] = []
        if not self.started:
            self.name = parsed["name"]
            events.append(ToolCallStart(self.index, self.id, self.name))
        if self._args_start is None or not self._args_end.done:
            # The block did not stream its arguments (unusual key order): send them whole.
            arguments = parsed.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            events.append(ToolCallArguments(self.index, text[self._emitted - (self._args_start or 0) :]))
        return events, True


class ToolCallExtractor:
    """Split streamed model text into content and tool calls; a partial tag never reaches content.

    With `incremental` (streaming), a call's deltas go out as soon as they are certain; otherwise a
    block is held until it ends and becomes content if malformed (invalid JSON, unknown function).
    """

    def __init__(self, functions: Collection[str], *, max_calls: int | None = None, incremental: bool = True):
        self._functions = set(functions)
        self._max_calls = max_calls
        self._incremental = incremental
        self._text = StopBuffer([OPEN_TAG])
        self._block: _CallBlock | None = None
        self._block_end = StopBuffer([CLOSE_TAG])
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
        tail = self._block_end.flush()
        if tail:
            events.extend(self._feed_block(tail))
        self._end_block(events, closed=False)
        return events

    def _push_text(self, text: str, events: list[Event]) -> str:
        self._content(self._text.push(text), events)
        if not self._text.stopped:
            return ""
        rest, self._text = self._text.after_stop, StopBuffer([OPEN_TAG])
        self._layout, self._blank = self._blank, ""  # white space before a call is layout, unless no call comes
        self._block = _CallBlock(self.calls, self._functions)
        self._block_end = StopBuffer([CLOSE_TAG])
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
        inner = self._block_end.push(text)
        if inner:
            events.extend(self._feed_block(inner))
        if not self._block_end.stopped:
            return ""
        rest = self._block_end.after_stop
        self._end_block(events, closed=True)
        return rest

    def _feed_block(self, text: str) -> list[Event]:
        produced = self._block.feed(text)
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
