"""Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks -> OpenAI tool-call events (pure)."""

from __future__ import annotations

import json
import re
from collections.abc import Collection

from edge_server.dialects.calls import (  # the events are re-exported: the pipeline imports them from here
    CLOSE_TAG,
    OPEN_TAG,
    CallExtractor,
    ClosingTagBlock,
    ContentDelta,
    Event,
    Functions,
    ToolCallArguments,
    ToolCallStart,
    new_call_id,
)
from edge_server.dialects.dialect import ToolDialect
from edge_server.dialects.constraints import tool_call_grammar

__all__ = ["CLOSE_TAG", "DIALECT", "OPEN_TAG", "ContentDelta", "Event", "ToolCallArguments",
           "ToolCallExtractor", "ToolCallStart", "new_call_id"]

_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_KEY = re.compile(r'\s*,\s*"arguments"\s*:\s*(?=\{)')
_NAME_PREFIX = '{"name":"'
_ARGUMENTS_PREFIX = ',"arguments":{'


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


class _CallBlock(ClosingTagBlock):
    """The JSON between one pair of tags, turned into events as soon as each part is certain."""

    def __init__(self, index: int, functions: Functions):
        super().__init__(index, functions)
        self._after_name = 0
        self._args_start: int | None = None
        self._args_end = _JsonValueEnd()
        self._emitted = 0  # end of the argument text already sent
        self._incremental = True  # False once the block departs from the usual key order

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
        if name not in self.functions:
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
            and parsed.get("name") in self.functions
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


class ToolCallExtractor(CallExtractor):
    """Hermes `<tool_call>` JSON blocks in streamed text -> content and tool-call events (see `CallExtractor`)."""

    def __init__(self, functions: Functions | Collection[str], *, max_calls: int | None = None,
                 incremental: bool = True):
        super().__init__(functions, _CallBlock, max_calls=max_calls, incremental=incremental)


# Qwen2.5 / Qwen3 / QwQ (and ChatML models): a JSON object of name and arguments in each block; the fallback.
DIALECT = ToolDialect("hermes", 0, matches=lambda template_source: True, extractor_type=ToolCallExtractor,
                      grammar=tool_call_grammar)
