"""Characters split over tokens arrive whole; end of turn is a token, not text (scripted model)."""

from __future__ import annotations

import pytest

from tests.conftest import SCRIPT, SCRIPT_TEXT
from tests.e2e.conftest import chat, stream_chat, streamed_text


def text_of(pieces: list[bytes]) -> str:
    return b"".join(pieces).decode("utf-8", errors="replace")


def test_scripted_answer_arrives_whole_and_ends_by_end_of_turn_token(scripted_server):
    answer = chat(scripted_server.base_url, temperature=0, max_tokens=100).json()
    assert answer["choices"][0]["message"]["content"] == SCRIPT_TEXT
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == len(SCRIPT)


def test_streamed_deltas_never_split_a_character(scripted_server):
    events = stream_chat(scripted_server.base_url, temperature=0, max_tokens=100)
    deltas = [e["choices"][0]["delta"]["content"] for e in events[1:] if isinstance(e, dict) and e["choices"]
              and e["choices"][0]["delta"].get("content")]
    assert "".join(deltas) == SCRIPT_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "👋" in deltas or any("👋" in d for d in deltas)


@pytest.mark.parametrize("max_tokens", [4, 6, 8, 9, 10])
def test_length_cut_keeps_every_finished_character(scripted_server, max_tokens):
    expected = text_of(SCRIPT[:max_tokens])
    whole = chat(scripted_server.base_url, temperature=0, max_tokens=max_tokens).json()
    assert whole["choices"][0]["message"]["content"] == expected
    assert whole["choices"][0]["finish_reason"] == "length"
    assert streamed_text(stream_chat(scripted_server.base_url, temperature=0, max_tokens=max_tokens)) == expected


def test_length_cut_inside_a_character_reports_it_instead_of_dropping_it(scripted_server):
    # 5 tokens end after the emoji's first two bytes: the unfinished character shows as U+FFFD.
    whole = chat(scripted_server.base_url, temperature=0, max_tokens=5).json()
    assert whole["choices"][0]["message"]["content"] == "Hello, world! \ufffd"


@pytest.mark.parametrize("stop, expected", [
    (" STOP", "Hello, world! 👋 你好"),
    ("好", "Hello, world! 👋 你"),          # the stop character itself spans two tokens
    ("👋", "Hello, world! "),
])
def test_stop_string_next_to_multibyte_characters(scripted_server, stop, expected):
    whole = chat(scripted_server.base_url, temperature=0, stop=stop).json()
    assert whole["choices"][0]["message"]["content"] == expected
    assert streamed_text(stream_chat(scripted_server.base_url, temperature=0, stop=stop)) == expected


def test_end_of_turn_text_inside_the_answer_does_not_end_it(scripted_server):
    answer = chat(scripted_server.base_url, temperature=0).json()["choices"][0]["message"]["content"]
    assert "<|im_end|> done." in answer
