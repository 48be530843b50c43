"""Thinking models' `<think>...</think>` block -> reasoning text apart from the answer (pure, streaming)."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

# The generation prompt of QwQ / Qwen3.5 ends inside the block: "...assistant\n<think>\n".
_OPENED_AT_END = re.compile(r"<think>\s*$")


@dataclass(frozen=True)
class ReasoningDelta:
    """Text of the model's reasoning, for `delta.reasoning_content`."""

    text: str


def template_thinks(template_source: str) -> bool:
    """Whether a chat template knows the `<think>` block (then its output is split)."""
    return OPEN_TAG in template_source


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves the model inside an open `<think>` block."""
    return _OPENED_AT_END.search(prompt_text) is not None


class _Phase(enum.Enum):
    OPENING = "opening"  # the output may still begin with <think>
    REASONING = "reasoning"
    ANSWER = "answer"


class ReasoningSplitter:
    """Split streamed output text into reasoning and answer text.

    Only a block at the very start of the output counts (as in llama.cpp and vLLM): `<think>` later
    on is the answer's own text. Nothing that may still become a tag is released, so no fragment of
    `<think>`/`</think>` reaches the answer; whitespace around the reasoning is trimmed as Qwen's
    templates do when they render it back.
    """

    def __init__(self, *, opened_in_prompt: bool, answer_openers: tuple[str, ...] = ()):
        # Tags that end the reasoning and begin the answer themselves: Qwen3.5 sometimes starts a
        # <tool_call> without closing </think> (llama.cpp reads it the same way).
        self._openers = answer_openers
        self._phase = _Phase.REASONING if opened_in_prompt else _Phase.OPENING
        self._held = ""  # text not yet released: a possible tag prefix or trailing whitespace
        self._reasoning_started = False  # leading whitespace of the reasoning is dropped
        self._answer_started = False  # so is the whitespace between </think> and the answer
        self._closed_block = False

    @property
    def in_block(self) -> bool:
        """Whether the output is inside the reasoning block now."""
        return self._phase is _Phase.REASONING

    @property
    def reasoned(self) -> bool:
        """Whether the output had a reasoning block (opened in the prompt or at the output's start)."""
        return self._phase is _Phase.REASONING or self._closed_block

    def push(self, text: str) -> tuple[str, str]:
        """Feed output text; returns (reasoning, answer) text now final."""
        self._held += text
        reasoning, answer = "", ""
        if self._phase is _Phase.OPENING:
            stripped = self._held.lstrip()
            if stripped.startswith(OPEN_TAG):
                self._phase = _Phase.REASONING
                self._held = stripped[len(OPEN_TAG):]
            elif OPEN_TAG.startswith(stripped):
                return "", ""  # still a possible "<think>" (or only whitespace so far)
            else:
                self._phase = _Phase.ANSWER
                self._answer_started = True  # no block: the answer keeps its leading whitespace
        if self._phase is _Phase.REASONING:
            reasoning = self._release_reasoning()
        if self._phase is _Phase.ANSWER:
            answer = self._release_answer()
        return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """Release what is held at the end of the output (an unterminated block stays reasoning)."""
        held, self._held = self._held, ""
        if self._phase is _Phase.REASONING:
            # A cut-off "</thi" was the tag being written, not reasoning.
            text = held[: len(held) - _partial_suffix(held, CLOSE_TAG)].rstrip()
            return (text if self._reasoning_started else text.lstrip()), ""
        if self._phase is _Phase.OPENING:
            return "", held
        return "", held if self._answer_started else held.lstrip()

    def _release_reasoning(self) -> str:
        ends = [(at, tag) for tag in (CLOSE_TAG, *self._openers) if (at := self._held.find(tag)) >= 0]
        if ends:
            end, tag = min(ends)
            # The close tag is dropped; an answer opener stays, as the answer's first text.
            body, rest = self._held[:end], self._held[end + (len(tag) if tag == CLOSE_TAG else 0):]
            self._phase, self._closed_block, self._held = _Phase.ANSWER, True, rest
            return self._trimmed(body.rstrip())
        # Hold back a possible start of a tag and trailing whitespace (trimmed if the block ends).
        keep = max(_partial_suffix(self._held, tag) for tag in (CLOSE_TAG, *self._openers))
        body = self._held[: len(self._held) - keep]
        releasable = body.rstrip()
        self._held = self._held[len(releasable):]
        return self._trimmed(releasable)

    def _trimmed(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text

    def _release_answer(self) -> str:
        text, self._held = self._held, ""
        if not self._answer_started:
            text = text.lstrip()
            self._answer_started = bool(text)
        return text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
